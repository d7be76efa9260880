"""Small helpers shared by the Triton kernels: block sizes and varlen chunk tables."""

from __future__ import annotations

import torch
import triton


def pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two >= max(n, lo) (Triton block shapes must be powers of two)."""
    return max(lo, triton.next_power_of_2(int(n)))


def chunk_table(cu_seqlens: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-chunk (sequence, chunk-within-sequence) pairs for a packed varlen batch.

    Returns (table [NC, 2] int32 on cu_seqlens' device, chunk_offsets [B+1] int32 (first chunk of
    each sequence), NC). One host sync: prefill grids are sized by the real chunk count.
    """
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    n_chunks = [(n + chunk - 1) // chunk for n in lens]
    seq = [b for b, c in enumerate(n_chunks) for _ in range(c)]
    idx = [i for c in n_chunks for i in range(c)]
    table = torch.tensor(list(zip(seq, idx)), dtype=torch.int32).reshape(-1, 2)
    offsets = torch.zeros(len(lens) + 1, dtype=torch.int32)
    offsets[1:] = torch.tensor(n_chunks, dtype=torch.int32).cumsum(0)
    dev = cu_seqlens.device
    return table.to(dev), offsets.to(dev), len(seq)
