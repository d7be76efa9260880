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
    n = x.shape[-1]
    rows = x.reshape(-1, n).contiguous()  # [M, n]
    # one collective into one buffer (no per-rank list, one copy to interleave)
    out = torch.empty(st.size * rows.shape[0], n, dtype=x.dtype, device=x.device)  # [size * M, n]
    dist.all_gather_into_tensor(out, rows, group=st.device_group)
    return out.view(st.size, -1, n).transpose(0, 1).reshape(*x.shape[:-1], st.size * n)
