"""Triton MoE GEMV kernels over block-FP8 weights: triton/moe_fp8.py's few-row path (decode, small
verify steps), the fp8 twin of moe_gemv.py. Weight only (w8a16): each fp8 tile is widened in
registers and multiplied by its 128x128 block's scale. Per (assignment, column block) program:
h = silu(x W_gate^T) * (x W_up^T), then one term per program w h W_down^T (a second launch); an
assignment index past the routed ones is the MoE block's gated shared expert of a token (its own
fp8 weights and bf16 sigmoid gate). moe_fp8.py sums each token's terms in order.

A k step of BK columns is BK / 128 sub-tiles unrolled (each inside one scale block, so one scale
per row and sub-tile): wide steps keep more weight bytes in flight per program.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._util import autotune
from .moe_gemv import _shared_gate

SUB = tl.constexpr(128)  # sub-tile width: divides the 128-multiple scale block width
# (BN, BK, warps); BK a multiple of SUB; the first is the interpreter's
_GEMV_CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w)
                 for bn, bk, w in ((16, 256, 4), (8, 256, 4), (16, 128, 4), (32, 128, 4), (8, 512, 4),
                                   (16, 512, 8), (4, 512, 2), (32, 256, 8), (64, 128, 8))]


@triton.jit
def _dot_rows8(v_ptr, w_ptr, s_ptr, n, nm, K, BLK_N: tl.constexpr, BLK_K: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr):
    """[BN] fp32: v (K values) . dequant(W)[n] for rows n of a row-major fp8 [*, K] weight whose
    block scales s are [*, cdiv(K, BLK_K)]."""
    kk = tl.arange(0, SUB)
    SK = tl.cdiv(K, BLK_K)
    s_row = s_ptr + (n // BLK_N) * SK                                             # [BN]
    acc = tl.zeros([BN, SUB], dtype=tl.float32)
    for k0 in range(0, K, BK):
        for j in tl.static_range(BK // SUB):
            k = k0 + j * SUB + kk
            km = k < K
            v = tl.load(v_ptr + k, mask=km, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            s = tl.load(s_row + tl.minimum((k0 + j * SUB) // BLK_K, SK - 1), mask=nm, other=0.0)  # (w = 0 past K)
            acc += w.to(tl.float32) * (s[:, None] * v[None, :])
    return tl.sum(acc, 1)


@triton.jit
def _gate_up_rows8(x_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, h_ptr, nb, H, N, BLK_N: tl.constexpr,
                   BLK_K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """h[n] = silu(x . Wg[n]) * (x . Wu[n]) for the BN rows n of block nb (fp8 Wg, Wu rows of H with
    block scales sg, su [*, cdiv(H, BLK_K)])."""
    n = nb * BN + tl.arange(0, BN)
    nm = n < N
    kk = tl.arange(0, SUB)
    SK = tl.cdiv(H, BLK_K)
    sg_row = sg_ptr + (n // BLK_N) * SK                                           # [BN]
    su_row = su_ptr + (n // BLK_N) * SK
    acc_g = tl.zeros([BN, SUB], dtype=tl.float32)
    acc_u = tl.zeros([BN, SUB], dtype=tl.float32)
    for k0 in range(0, H, BK):  # gate and up tiles in one loop: twice the loads in flight
        for j in tl.static_range(BK // SUB):
            k = k0 + j * SUB + kk
            km = k < H
            wm = nm[:, None] & km[None, :]
            xv = tl.load(x_ptr + k, mask=km, other=0.0).to(tl.float32)
            wg = tl.load(wg_ptr + n[:, None] * H + k[None, :], mask=wm, other=0.0)
            wu = tl.load(wu_ptr + n[:, None] * H + k[None, :], mask=wm, other=0.0)
            kb = tl.minimum((k0 + j * SUB) // BLK_K, SK - 1)  # in bounds past H too (w = 0 there)
            sg = tl.load(sg_row + kb, mask=nm, other=0.0)
            su = tl.load(su_row + kb, mask=nm, other=0.0)
            acc_g += wg.to(tl.float32) * (sg[:, None] * xv[None, :])
            acc_u += wu.to(tl.float32) * (su[:, None] * xv[None, :])
    g = tl.sum(acc_g, 1)
    u = tl.sum(acc_u, 1)
    dt = h_ptr.dtype.element_ty
    # round like the reference (products in the activation dtype, then the gate)
    gt = g.to(dt).to(tl.float32)
    hv = (gt / (1.0 + tl.exp(-gt))).to(dt).to(tl.float32) * u.to(dt).to(tl.float32)
    tl.store(h_ptr + n, hv.to(dt), mask=nm)


@autotune(_GEMV_CONFIGS, key=["H", "I", "TB"])
@triton.jit(do_not_specialize=["TB", "M"])
def _gemv_gate_up_kernel(x_ptr, w_ptr, s_ptr, ids_ptr, h_ptr, g8_ptr, gs_ptr, u8_ptr, us_ptr, hs_ptr, M, H, I, IS,
                         TB, TOPK: tl.constexpr, BLK_N: tl.constexpr, BLK_K: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr):
    """Program (a, block): a < M is routed assignment a (token a // TOPK, expert ids[a]; gate|up
    rows [2I, H], scales [2I / BLK_N, SK]) -> h[a]; a >= M the shared expert (gate, up [IS, H])
    of token a - M -> hs[a - M]."""
    a = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    SK = tl.cdiv(H, BLK_K)
    if a < M:
        e = tl.load(ids_ptr + a)
        wg = w_ptr + e * (2 * I) * H
        sg = s_ptr + e * ((2 * I) // BLK_N) * SK
        _gate_up_rows8(x_ptr + (a // TOPK) * H, wg, wg + I * H, sg, sg + (I // BLK_N) * SK, h_ptr + a * I, nb,
                       H, I, BLK_N, BLK_K, BN, BK)
    else:
        t = a - M
        _gate_up_rows8(x_ptr + t * H, g8_ptr, u8_ptr, gs_ptr, us_ptr, hs_ptr + t * IS, nb, H, IS, BLK_N, BLK_K,
                       BN, BK)


@autotune(_GEMV_CONFIGS, key=["H", "I", "TB"])
@triton.jit(do_not_specialize=["TB", "M"])
def _gemv_down_kernel(h_ptr, w_ptr, s_ptr, ids_ptr, rw_ptr, y_ptr, hs_ptr, d8_ptr, ds_ptr, x_ptr, sgw_ptr, M, H, I,
                      IS, TB, TOPK: tl.constexpr, NS: tl.constexpr, BLK_N: tl.constexpr, BLK_K: tl.constexpr,
                      BN: tl.constexpr, BK: tl.constexpr):
    """One term per program: a < M routed assignment a -> y[t, j] = w h W_down^T; a >= M the shared
    expert of token t = a - M, weighted by its sigmoid gate -> y[t, TOPK]. Rows of y
    [T, TOPK + NS, H] are rounded like the reference; the caller adds them in order."""
    a = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nm = n < H
    dt = y_ptr.dtype.element_ty
    if a < M:
        e = tl.load(ids_ptr + a)
        sd = s_ptr + e * tl.cdiv(H, BLK_N) * tl.cdiv(I, BLK_K)
        acc = _dot_rows8(h_ptr + a * I, w_ptr + e * H * I, sd, n, nm, I, BLK_N, BLK_K, BN, BK)
        rw = tl.load(rw_ptr + a).to(dt).to(tl.float32)
        row = (a // TOPK) * (TOPK + NS) + a % TOPK
    else:
        t = a - M
        acc = _dot_rows8(hs_ptr + t * IS, d8_ptr, ds_ptr, n, nm, IS, BLK_N, BLK_K, BN, BK)
        rw = _shared_gate(x_ptr + t * H, sgw_ptr, H, dt, BK)
        row = t * (TOPK + NS) + TOPK
    tl.store(y_ptr + row * H + n, (acc.to(dt).to(tl.float32) * rw).to(dt), mask=nm)
