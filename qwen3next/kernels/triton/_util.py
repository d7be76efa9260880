"""Small helpers shared by the Triton kernels: block sizes and varlen chunk tables."""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ...env_switches import switch


def autotune(configs: list, key: list[str], **kw):
    """triton.autotune, but with only the first config under the interpreter (CPU tests), where
    timing configs would only cost minutes, and with QWEN3NEXT_AUTOTUNE=0 (GPU correctness runs:
    one compile per shape instead of one per config)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or switch("QWEN3NEXT_AUTOTUNE") == "0":
        configs = configs[:1]
    return triton.autotune(configs=configs, key=key, **kw)


def size_class(n: int) -> int:
    """A coarse size class (1, 8, 64, 512, 4096) for autotuning keys: configs are timed once per
    class, not per exact size, so a serving run meets few new classes after its warm-up."""
    c = 1
    while c < n and c < 4096:
        c *= 8
    return c


def pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two >= max(n, lo) (Triton block shapes must be powers of two)."""
    return max(lo, triton.next_power_of_2(int(n)))


@triton.jit
def chunk_of(cu_ptr, B, i_c, BT: tl.constexpr, BB: tl.constexpr):
    """Flat chunk i_c of a packed varlen batch -> (sequence, chunk within it); sequence -1 past
    the last chunk. Computed in the kernel from cu_seqlens (no host-side table, no sync): grids
    are sized by the bound total // BT + B, since each sequence wastes less than one chunk."""
    j = tl.arange(0, BB)
    lo = tl.load(cu_ptr + j, mask=j < B, other=0)
    hi = tl.load(cu_ptr + j + 1, mask=j < B, other=0)
    n = (hi - lo + BT - 1) // BT                                  # chunks per sequence  [BB]
    seq = tl.sum((tl.cumsum(n, 0) <= i_c).to(tl.int32), 0)      # sequences wholly before i_c
    start = tl.sum(tl.where(j < seq, n, 0), 0)
    return tl.where(seq < B, seq, -1), i_c - start


@triton.jit
def chunk_start(cu_ptr, B, b, BT: tl.constexpr, BB: tl.constexpr):
    """Index of sequence b's first chunk in the flat chunk order."""
    j = tl.arange(0, BB)
    lo = tl.load(cu_ptr + j, mask=j < B, other=0)
    hi = tl.load(cu_ptr + j + 1, mask=j < B, other=0)
    return tl.sum(tl.where(j < b, (hi - lo + BT - 1) // BT, 0), 0)
