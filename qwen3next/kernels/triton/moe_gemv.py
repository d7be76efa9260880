"""Triton MoE GEMV kernels: the few-row path of triton/moe.py (decode, small verify steps), where
weight streaming is all that costs. Per (assignment, column block) program: h = silu(x W_gate^T) *
(x W_up^T) (one launch), then one term w h W_down^T (a second launch); an assignment index past
the routed ones is the MoE block's gated shared expert of a token (its own weights and sigmoid
gate). triton/moe.py launches them and sums each token's terms in order.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._util import autotune

# (BN, BK, warps); the first is the interpreter's
_GEMV_CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w)
                 for bn, bk, w in ((16, 256, 4), (8, 256, 4), (16, 128, 4), (32, 128, 4), (8, 512, 4),
                                   (16, 256, 8), (4, 512, 2), (32, 256, 8), (16, 512, 8), (64, 128, 8))]


@triton.jit
def _gate_up_rows(x_ptr, wg_ptr, wu_ptr, h_ptr, nb, H, N, BN: tl.constexpr, BK: tl.constexpr):
    """h[n] = silu(x . Wg[n]) * (x . Wu[n]) for the BN rows n of block nb (x, Wg, Wu rows of H)."""
    n = nb * BN + tl.arange(0, BN)
    nm = n < N
    kk = tl.arange(0, BK)
    acc_g = tl.zeros([BN, BK], dtype=tl.float32)
    acc_u = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(0, H, BK):
        km = (k0 + kk) < H
        xv = tl.load(x_ptr + k0 + kk, mask=km, other=0.0).to(tl.float32)
        wg = tl.load(wg_ptr + n[:, None] * H + k0 + kk[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        wu = tl.load(wu_ptr + n[:, None] * H + k0 + kk[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        acc_g += wg.to(tl.float32) * xv[None, :]
        acc_u += wu.to(tl.float32) * xv[None, :]
    dt = h_ptr.dtype.element_ty
    # round like the reference (products in the activation dtype, then the gate)
    gt = tl.sum(acc_g, 1).to(dt).to(tl.float32)
    hv = (gt / (1.0 + tl.exp(-gt))).to(dt).to(tl.float32) * tl.sum(acc_u, 1).to(dt).to(tl.float32)
    tl.store(h_ptr + n, hv.to(dt), mask=nm)


@triton.jit
def _rows_dot(v_ptr, w_ptr, n, nm, K, BN: tl.constexpr, BK: tl.constexpr):
    """[BN] fp32: v (K values) . W[n] for rows n of a row-major [*, K] weight."""
    kk = tl.arange(0, BK)
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        km = (k0 + kk) < K
        v = tl.load(v_ptr + k0 + kk, mask=km, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + n[:, None] * K + k0 + kk[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        acc += w.to(tl.float32) * v[None, :]
    return tl.sum(acc, 1)


@triton.jit
def _shared_gate(x_ptr, sgw_ptr, H, dt: tl.constexpr, BK: tl.constexpr):
    """sigmoid(x . w) rounded like torch.sigmoid(linear(x)) in dtype dt (fp32 scalar)."""
    kk = tl.arange(0, BK)
    acc = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, H, BK):
        km = (k0 + kk) < H
        acc += (tl.load(x_ptr + k0 + kk, mask=km, other=0.0).to(tl.float32)
                * tl.load(sgw_ptr + k0 + kk, mask=km, other=0.0).to(tl.float32))
    g = tl.sum(acc, 0).to(dt).to(tl.float32)
    return (1.0 / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)


@autotune(_GEMV_CONFIGS, key=["H", "I", "TB"])
@triton.jit(do_not_specialize=["TB", "M"])
def _gemv_gate_up_kernel(x_ptr, w_ptr, ids_ptr, h_ptr, sg_ptr, su_ptr, hs_ptr, M, H, I, IS, TB,
                         TOPK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Program (a, block): a < M is routed assignment a (token a // TOPK, expert ids[a]) -> h[a];
    a >= M the shared expert (rows of IS) of token a - M -> hs[a - M]."""
    a = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    if a < M:
        wg = w_ptr + tl.load(ids_ptr + a) * (2 * I) * H
        _gate_up_rows(x_ptr + (a // TOPK) * H, wg, wg + I * H, h_ptr + a * I, nb, H, I, BN, BK)
    else:
        t = a - M
        _gate_up_rows(x_ptr + t * H, sg_ptr, su_ptr, hs_ptr + t * IS, nb, H, IS, BN, BK)


@autotune(_GEMV_CONFIGS, key=["H", "I", "TB"])
@triton.jit(do_not_specialize=["TB", "M"])
def _gemv_down_kernel(h_ptr, w_ptr, ids_ptr, rw_ptr, y_ptr, hs_ptr, sd_ptr, x_ptr, sgw_ptr, M, H, I, IS, TB,
                      TOPK: tl.constexpr, NS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One term per program (a loop over a token's terms in one program measured 1.5x slower on the
    H200, B = 1: fewer loads in flight): a < M routed assignment
    a -> y[t, j] = w h W_down^T; a >= M the shared expert of token t = a - M -> y[t, TOPK]. Rows
    of y [T, TOPK + NS, H] are rounded like the reference; _sum_k_kernel adds them in order."""
    a = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nm = n < H
    dt = y_ptr.dtype.element_ty
    if a < M:
        acc = _rows_dot(h_ptr + a * I, w_ptr + tl.load(ids_ptr + a) * H * I, n, nm, I, BN, BK)
        rw = tl.load(rw_ptr + a).to(dt).to(tl.float32)
        row = (a // TOPK) * (TOPK + NS) + a % TOPK
    else:
        t = a - M
        acc = _rows_dot(hs_ptr + t * IS, sd_ptr, n, nm, IS, BN, BK)
        rw = _shared_gate(x_ptr + t * H, sgw_ptr, H, dt, BK)
        row = t * (TOPK + NS) + TOPK
    tl.store(y_ptr + row * H + n, (acc.to(dt).to(tl.float32) * rw).to(dt), mask=nm)
