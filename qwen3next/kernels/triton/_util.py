"""Small helpers shared by the Triton kernels: block sizes and varlen chunk tables."""

from __future__ import annotations

import os

import torch
import triton


def autotune(configs: list, key: list[str], **kw):
    """triton.autotune, but with only the first config under the interpreter (CPU tests), where
    timing configs would only cost minutes."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        configs = configs[:1]
    return triton.autotune(configs=configs, key=key, **kw)


def pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two >= max(n, lo) (Triton block shapes must be powers of two)."""
    return max(lo, triton.next_power_of_2(int(n)))


def chunk_table(cu_seqlens: torch.Tensor, chunk: int, total: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-chunk (sequence, chunk-within-sequence) pairs for a packed varlen batch of `total` tokens.

    Built on the device with no host sync (no pipeline bubble, graph-capturable): the table has
    the upper bound NC = total // chunk + B rows (each sequence wastes less than one chunk);
    rows past the real chunks hold sequence -1 and their programs exit at once.
    Returns (table [NC, 2] int32, chunk_offsets [B+1] int64 = first chunk of each sequence, NC).
    """
    B = cu_seqlens.numel() - 1
    NC = total // chunk + B
    n_chunks = (cu_seqlens[1:] - cu_seqlens[:-1] + chunk - 1) // chunk      # [B]
    offsets = torch.zeros(B + 1, dtype=torch.int64, device=cu_seqlens.device)
    offsets[1:] = n_chunks.cumsum(0)
    i = torch.arange(NC, device=cu_seqlens.device)
    seq = torch.searchsorted(offsets[1:], i, right=True)                      # [NC]
    valid = seq < B
    seq_c = seq.clamp(max=max(B - 1, 0))
    table = torch.stack([torch.where(valid, seq_c, -1), torch.where(valid, i - offsets[seq_c], 0)], 1)
    return table.to(torch.int32).contiguous(), offsets, NC
