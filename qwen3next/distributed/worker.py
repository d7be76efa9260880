"""A tensor-parallel worker (ranks 1..N-1), one process each, started by launch.py.

It joins the group, loads its shard of the checkpoint, reports "ready" (or the error) to rank 0
through a pipe, then mirrors rank 0's model calls and decode-graph captures / replays until told
to stop. Rank 0 schedules and samples; a worker only runs forwards (its all-reduces / all-gathers
pair with rank 0's). It exits when its parent (rank 0) dies, whether or not a collective notices.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import threading
import time
import traceback

import torch

logger = logging.getLogger("qwen3next.distributed")


def _exit_with_parent(parent_pid: int) -> None:
    """A daemon thread: rank 0 gone (re-parented) -> exit at once, without cleanup."""
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()


def worker_main(rank: int, size: int, init_method: str, model_dir: str, dtype: torch.dtype, device_type: str,
                with_mtp: bool, conn, parent_pid: int, timeout_s: float, num_threads: int,
                hf_overrides: dict | None = None, load_format: str = "auto") -> None:
    faulthandler.enable()  # a crash in native code prints its Python stack (else the rank just vanishes)
    _exit_with_parent(parent_pid)
    torch.set_num_threads(num_threads)
    from qwen3next.loader import load_model

    from .parallel_state import destroy_tp, init_tp

    device = torch.device(f"cuda:{rank}") if device_type == "cuda" else torch.device("cpu")
    try:
        init_tp(rank, size, init_method, device, timeout_s)
        model, _ = load_model(model_dir, dtype=dtype, device=device, with_mtp=with_mtp, progress=False,
                              hf_overrides=hf_overrides, load_format=load_format)
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, which raises it
        # logged here too: a rank 0 still waiting in the rendezvous reads the pipe only meanwhile
        logger.error("tensor-parallel rank %d failed to start:\n%s", rank, traceback.format_exc())
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    try:
        serve(model, device)
    except BaseException:  # noqa: BLE001 - rank 0's own collectives fail next; say why here
        logger.error("tensor-parallel rank %d failed:\n%s", rank, traceback.format_exc())
        os._exit(1)
    destroy_tp()


@torch.inference_mode()
def serve(model: torch.nn.Module, device: torch.device) -> None:
    """Mirror rank 0: allocate the cache, run forwards and logits, until "stop"."""
    from qwen3next.engine.cache import allocate_cache
    from qwen3next.engine.cuda_graph import CudaGraphRunner

    from .messages import recv, unpack_batch

    cache = graphs = None
    while True:
        kind, payload = recv()
        if kind == "stop":
            return
        if kind == "cache":
            plan, dtype = payload
            cache = graphs = None  # free the old ones first
            cache = allocate_cache(model.state_spec(), plan, dtype, device)
        elif kind == "graphs":  # capture rank 0's decode graphs, in the same order (graphs.py)
            max_blocks, sizes = payload
            graphs = CudaGraphRunner(model, cache, max_blocks, sizes[-1], sizes)
            graphs.capture()
        elif kind == "replay":
            ids, pos, fields, copies = payload
            apply_copies(cache, copies)
            graphs.run(ids.to(device), pos.to(device), unpack_batch(fields, cache, device))
        elif kind == "forward":
            ids, pos, fields, copies = payload
            apply_copies(cache, copies)
            batch = unpack_batch(fields, cache, device)
            model(ids.to(device), pos.to(device), batch)
        elif kind == "mtp":
            ids, hidden, pos, fields, copies = payload
            apply_copies(cache, copies)
            model.mtp(ids.to(device), hidden.to(device), pos.to(device), unpack_batch(fields, cache, device))
        elif kind == "logits":
            model.compute_logits(payload.to(device))
        else:
            raise RuntimeError(f"unknown message {kind!r}")


def apply_copies(cache, copies: list[tuple]) -> None:
    """Replay rank 0's cache copies, in order: ("block", src, dst) KV blocks (n > 1 forks) or
    ("slots", [src], [dst]) DeltaNet states (forks, speculative rollback)."""
    for what, src, dst in copies:
        if what == "block":
            for kv in cache.kv.values():
                kv[dst].copy_(kv[src])
        else:
            s, d = torch.tensor(src), torch.tensor(dst)
            for t in (*cache.conv.values(), *cache.recurrent.values()):
                t[d.to(t.device)] = t[s.to(t.device)]
