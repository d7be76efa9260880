"""Triton block-FP8 linear: y = x @ dequant(W8)^T, weight fp8 [N, K] + fp32 scale_inv per
(bn x bk) block, activations bf16 (or fp32), kernels/fp8.py's fp8_linear (weight only: w8a16
throughout). By the number of rows M:

* M <= GEMV_M (decode of a few sequences): a GEMV per (BN-row block of W, row of x) on the CUDA
  cores, w8a16, 128-wide sub-tiles unrolled per k step; no K split, one launch.
* M <= SKINNY_M (decode of a batch): w8a16 with the operands swapped, y^T = W x^T: 64+ weight
  rows fill the MMA's M side (Hopper wgmma) where 16-row x tiles would waste it; x^T comes from
  L2; narrow weights are split along K (fp32 partials summed in a fixed order by a second launch).
  (A w8a8 form, x quantised per 128-group in the kernel and fp8 x fp8 on the tensor cores, measured
  slower on the H200, 305 vs 264 us per B = 64 step, and less accurate: not kept.)
* M <= SMALL_M (verify): the weight-only GEMM (w8a16): each [BK, BN] fp8 tile widened to the
  activation dtype on the tensor cores, its block scale on the fp32 partial product; K split as above.
* many rows (prefill): the weight is dequantised into a bf16 scratch (one pass, N*K*3 bytes) and
  cuBLAS runs the GEMM: at M >= 256 the GEMM's FLOPs dwarf that pass.
* with DENSE_A8 (env QWEN3NEXT_FP8_DENSE_A8=1; benchmarks toggle the attribute), prefill rows
  (M > SMALL_M) take linear_fp8_a8.py's w8a8 GEMM instead (activations quantised per token and
  128-group, fp8 tensor cores; needs 128-wide K scale blocks, else dequant). Verify sizes keep the
  K-split w8a16 GEMM: 64-row tiles without a K split leave most SMs idle at M <= 128.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...env_switches import switch
from ._util import autotune, size_class
from .linear_fp8_a8 import fp8_linear_a8
from .linear_fp8_a8 import supports as a8_supports
from .moe_fp8_gemv import _dot_rows8

GEMV_M = 4  # rows up to this take the GEMV (0: off)
SKINNY_M = 64  # then up to this the swapped skinny GEMM (0: off)
SMALL_M = 128  # then up to this the weight-only GEMM
DENSE_A8 = switch("QWEN3NEXT_FP8_DENSE_A8") == "1"  # M > SMALL_M: w8a8 (read per call)
_PROGRAMS = 264  # K is split until about this many programs (2 per SM of an H100 / H200)
# (BM, BN, BK, warps, stages); the first is the interpreter's. BK divides the 128-wide scale block.
_CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((16, 32, 64, 4, 4), (16, 64, 128, 4, 4), (16, 32, 128, 4, 5),
                                     (16, 128, 128, 4, 3), (64, 64, 128, 4, 4), (64, 128, 128, 8, 3))]
# GEMV: (BN, BK, warps), BK a multiple of 128; the first is the interpreter's (two sub-tiles a step)
_GEMV_CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w)
                 for bn, bk, w in ((8, 256, 4), (16, 256, 4), (8, 512, 4), (16, 512, 8), (4, 512, 2), (16, 128, 4),
                                   (32, 128, 4), (32, 256, 8))]
# skinny: (BN weight rows, BK, warps, stages); BK divides 128; the first is the interpreter's
_SKINNY_CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
                   for bn, bk, w, s in ((64, 64, 4, 4), (64, 128, 4, 4), (64, 128, 4, 3), (128, 128, 8, 3),
                                        (64, 64, 4, 6), (128, 128, 4, 4), (32, 128, 4, 4))]


@autotune(_GEMV_CONFIGS, key=["N", "K"])
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, BLK_N: tl.constexpr, BLK_K: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr):
    """Program (n block, row r): y[r, n block] on the CUDA cores (moe_fp8_gemv's fp8 row dot: 128-wide
    sub-tiles unrolled per k step); the programs of one n block run side by side, so the rows
    after the first read the weight tile from L2."""
    n = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)
    r = tl.program_id(1).to(tl.int64)
    nm = n < N
    y = _dot_rows8(x_ptr + r * K, w_ptr, s_ptr, n, nm, K, BLK_N, BLK_K, BN, BK)
    tl.store(y_ptr + r * N + n, y.to(y_ptr.dtype.element_ty), mask=nm)


@autotune(_SKINNY_CONFIGS, key=["N", "K", "BM", "KS"])
@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, SK, KS, BLK_N: tl.constexpr, BLK_K: tl.constexpr,
                   PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Program (n block, k split): y^T[BN weight rows, all M <= BM rows of x] = W [BN, BK] @ x^T
    [BK, BM], the weight as the MMA's M side (swapped: 64+ weight rows fill it where 16-row x
    tiles would waste it; x^T is read from L2 by every program); columns [ps*KS, (ps+1)*KS) of
    K, with more than one split fp32 partials at y_ptr[ps]."""
    pn = tl.program_id(0)
    ps = tl.program_id(1)
    n = (pn * BN + tl.arange(0, BN)).to(tl.int64)
    nm = n < N
    m = tl.arange(0, BM)
    mm = m < M
    kk = tl.arange(0, BK)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    s_row = s_ptr + (n // BLK_N) * SK                                  # [BN] scale row of each weight row
    for k0 in range(ps * KS, tl.minimum(ps * KS + KS, K), BK):
        km = (k0 + kk) < K
        w = tl.load(w_ptr + n[:, None] * K + (k0 + kk)[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        xt = tl.load(x_ptr + m[None, :] * K + (k0 + kk)[:, None], mask=km[:, None] & mm[None, :], other=0.0)
        sc = tl.load(s_row + k0 // BLK_K, mask=nm, other=0.0)          # [BN]: one k block per tile
        acc += tl.dot(w.to(dt), xt, input_precision=PREC) * sc[:, None]
    out = y_ptr + ps * M * N + m[None, :] * N + n[:, None]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=nm[:, None] & mm[None, :])


@autotune(_CONFIGS, key=["N", "K", "MB", "S"])
@triton.jit(do_not_specialize=["M", "MB"])
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, MB, SK, S, KS, BLK_N: tl.constexpr, BLK_K: tl.constexpr,
                  PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Program (m block, n block, k split): columns [ps*KS, (ps+1)*KS) of K; with S > 1 it writes
    fp32 partials at y_ptr[ps]."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    ps = tl.program_id(2)
    m = (pm * BM + tl.arange(0, BM)).to(tl.int64)
    n = (pn * BN + tl.arange(0, BN)).to(tl.int64)
    kk = tl.arange(0, BK)
    mm = m < M
    nm = n < N
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    s_row = s_ptr + (n // BLK_N) * SK                                  # [BN] scale row of each column
    for k0 in range(ps * KS, tl.minimum(ps * KS + KS, K), BK):
        km = (k0 + kk) < K
        xv = tl.load(x_ptr + m[:, None] * K + (k0 + kk)[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        wv = tl.load(w_ptr + n[None, :] * K + (k0 + kk)[:, None], mask=km[:, None] & nm[None, :], other=0.0)
        sc = tl.load(s_row + k0 // BLK_K, mask=nm, other=0.0)          # [BN]: one k block per tile
        acc += tl.dot(xv, wv.to(dt), input_precision=PREC) * sc[None, :]
    out = y_ptr + ps * M * N + m[:, None] * N + n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])


@triton.jit
def _sum_splits_kernel(p_ptr, y_ptr, MN, S, BLK: tl.constexpr):
    i = tl.program_id(0) * BLK + tl.arange(0, BLK)
    msk = i < MN
    acc = tl.zeros([BLK], dtype=tl.float32)
    for s in range(S):  # a fixed order: the same bits every run
        acc += tl.load(p_ptr + s * MN + i, mask=msk, other=0.0)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, o_ptr, N, K, SK, BLK_N: tl.constexpr, BLK_K: tl.constexpr,
                    BR: tl.constexpr, BC: tl.constexpr):
    r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    msk = (r < N)[:, None] & (c < K)[None, :]
    w = tl.load(w_ptr + r[:, None] * K + c[None, :], mask=msk, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + (r // BLK_N)[:, None] * SK + (c // BLK_K)[None, :], mask=msk, other=0.0)
    tl.store(o_ptr + r[:, None] * K + c[None, :], (w * s).to(o_ptr.dtype.element_ty), mask=msk)


def dequantize(w8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """w8 [N, K] fp8 -> [N, K] in `dtype` (one pass; rounding as kernels/fp8.dequantize)."""
    N, K = w8.shape
    out = torch.empty(N, K, dtype=dtype, device=w8.device)
    BR, BC = 32, 128
    _dequant_kernel[(triton.cdiv(N, BR), triton.cdiv(K, BC))](w8, scale, out, N, K, scale.shape[1],
                                                              BLK_N=block[0], BLK_K=block[1], BR=BR, BC=BC)
    return out


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128),
               *, path: str | None = None) -> torch.Tensor:
    """x [M, K] (bf16 / fp32), w8 [N, K] fp8, scale [ceil(N/bn), ceil(K/bk)] fp32 -> [M, N] in x's
    dtype. `path` forces one of "gemv", "skinny", "w8a16", "dequant", "a8" (tests, benchmarks); by
    default it follows M and DENSE_A8 (module docstring)."""
    M, K = x.shape
    N = w8.shape[0]
    if path is None:
        path = ("gemv" if M <= GEMV_M else "skinny" if M <= SKINNY_M else "w8a16" if M <= SMALL_M
                else "a8" if DENSE_A8 and a8_supports(w8, block) else "dequant")
    if path == "a8":
        return fp8_linear_a8(x, w8, scale, block)
    if path == "dequant":
        return x @ dequantize(w8, scale, block, x.dtype).t()
    if block[1] % 128:
        raise ValueError(f"fp8_linear needs 128 | weight_block_size[1], got {block[1]}")
    x = x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    if path == "gemv":
        _gemv_kernel[lambda meta: (triton.cdiv(N, meta["BN"]), M)](x, w8, scale, y, N, K, BLK_N=block[0],
                                                                    BLK_K=block[1])
        return y
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    if path == "skinny":
        # K splits (whole 128-column blocks) until ~one program per SM: 64-row blocks of a narrow
        # weight alone would leave most SMs idle
        S = max(1, min(K // 512, (_PROGRAMS // 2) // triton.cdiv(N, 64)))
        KS = triton.cdiv(triton.cdiv(K, S), 128) * 128
        S = triton.cdiv(K, KS)
        part = y if S == 1 else torch.empty(S, M, N, dtype=torch.float32, device=x.device)
        _skinny_kernel[lambda meta: (triton.cdiv(N, meta["BN"]), S)](
            x, w8, scale, part, M, N, K, scale.shape[1], KS, BLK_N=block[0], BLK_K=block[1], PREC=prec,
            BM=max(16, triton.next_power_of_2(M)))
    else:
        # K splits (whole 128-column scale blocks each) for weights too narrow to fill the GPU
        base = triton.cdiv(M, 16) * triton.cdiv(N, 32)
        S = max(1, min(K // 256, _PROGRAMS // base))
        KS = triton.cdiv(triton.cdiv(K, S), 128) * 128
        S = triton.cdiv(K, KS)
        part = y if S == 1 else torch.empty(S, M, N, dtype=torch.float32, device=x.device)
        grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]), S)  # noqa: E731
        _w8a16_kernel[grid](x, w8, scale, part, M, N, K, size_class(M), scale.shape[1], S, KS, BLK_N=block[0],
                            BLK_K=block[1], PREC=prec)
    if S > 1:
        BLK = 1024
        _sum_splits_kernel[(triton.cdiv(M * N, BLK),)](part, y, M * N, S, BLK=BLK)
    return y
