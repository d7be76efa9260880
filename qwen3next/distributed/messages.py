"""What rank 0 sends the workers each step, over the gloo control group: a pickled tuple
(kind, payload) with every tensor on the CPU. Kinds: "cache" (allocate the cache of a plan),
"forward" (input ids, positions, the ForwardBatch's fields, pending cache copies), "mtp" (the
same plus the hidden states the MTP head reads), "logits" (hidden rows to project), "stop".
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from qwen3next.forward_batch import ForwardBatch, ModelCache

from .parallel_state import tp_state


def send(msg: tuple) -> None:
    """Rank 0: broadcast `msg` to every worker."""
    dist.broadcast_object_list([msg], src=0, group=tp_state().cpu_group)


def recv() -> tuple:
    """Worker: the next message from rank 0 (blocks until one comes)."""
    box = [None]
    dist.broadcast_object_list(box, src=0, group=tp_state().cpu_group)
    return box[0]


def pack_batch(batch: ForwardBatch) -> dict:
    """The batch's dataclass fields, tensors moved to the CPU; the cache becomes a flag."""
    out = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if f.name == "cache":
            v = v is not None
        elif isinstance(v, torch.Tensor):
            v = v.cpu()
        out[f.name] = v
    return out


def unpack_batch(d: dict, cache: ModelCache | None, device: torch.device) -> ForwardBatch:
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    kw["cache"] = cache if kw["cache"] else None
    return ForwardBatch(**kw)
