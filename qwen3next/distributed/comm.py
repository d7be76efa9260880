"""The collectives the sharded model calls (only ever when tp_size() > 1): the all-reduce after a
row-parallel projection / expert block / vocab-parallel lookup, and the all-gather of the
vocab-sharded logits."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .parallel_state import tp_state


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over the ranks (in place; returns x)."""
    dist.all_reduce(x, group=tp_state().device_group)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """[..., n] on each rank -> [..., size * n], rank r's part at [r * n, (r + 1) * n)."""
    st = tp_state()
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(st.size)]
    dist.all_gather(parts, x, group=st.device_group)
    return torch.cat(parts, dim=-1)
