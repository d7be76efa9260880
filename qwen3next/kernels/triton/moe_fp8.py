"""Triton MoE experts over block-FP8 weights (w8a16): kernels/fp8.py's moe_experts_fp8, same
signature. The two paths of triton/moe.py (whose grouping `_align` and k-sum kernel are reused):

* few assignments (decode, M = T*k <= GEMV_MAX_ROWS): per (assignment, column block) GEMVs; each
  weight tile is read as fp8, widened in registers and multiplied by its 128x128 block's scale.
* otherwise the grouped GEMM: BM-row blocks of one expert's assignments; each [BK, BN] fp8 tile is
  widened to bf16 for the tensor cores and its block scale applied to the fp32 partial product.

Half the weight bytes of bf16: the decode step, which streams the routed experts, is where it pays.
Rounding follows the reference (products in the activation dtype, then the gate, the routing
weight, the fp32 sum over k). Scale blocks must be 128 wide (BK divides them) and I a multiple of
the row block (gate and up rows never share a scale block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import autotune, pow2, size_class
from .moe import GEMV_MAX_ROWS, _align, _sum_k_kernel

# (BN, BK, warps, stages); the first is the interpreter's. BK divides 128.
_GEMM_CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=st)
                 for bn, bk, w, st in ((32, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4),
                                       (64, 64, 4, 4))]
_GEMV_CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w)
                 for bn, bk, w in ((16, 128, 4), (8, 128, 4), (32, 128, 4), (16, 128, 8))]


@autotune(_GEMM_CONFIGS, key=["H", "I", "BM", "NBK"])
@triton.jit(do_not_specialize=["NBK"])
def _gate_up_kernel(x_ptr, w_ptr, s_ptr, rows_ptr, be_ptr, h_ptr, H, I, NBK, TOPK: tl.constexpr,
                    BLK_N: tl.constexpr, BLK_K: tl.constexpr, PREC: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    e = tl.load(be_ptr + pm).to(tl.int64)
    if e >= 0:
        r = pm * BM + tl.arange(0, BM)
        a = tl.load(rows_ptr + r)
        valid = a >= 0
        tok = tl.where(valid, a // TOPK, 0)
        n = pn * BN + tl.arange(0, BN)
        nm = n < I
        kk = tl.arange(0, BK)
        SN, SK = (2 * I) // BLK_N, tl.cdiv(H, BLK_K)
        dt = x_ptr.dtype.element_ty
        acc_g = tl.zeros([BM, BN], dtype=tl.float32)
        acc_u = tl.zeros([BM, BN], dtype=tl.float32)
        wg_ptr = w_ptr + e * (2 * I) * H + n[None, :] * H + kk[:, None]          # [BK, BN] = W_gate^T
        sg_ptr = s_ptr + e * SN * SK + (n // BLK_N) * SK                          # [BN] scale rows
        su_ptr = sg_ptr + (I // BLK_N) * SK
        for k0 in range(0, H, BK):
            km = (k0 + kk) < H
            x = tl.load(x_ptr + tok[:, None] * H + (k0 + kk)[None, :], mask=valid[:, None] & km[None, :], other=0.0)
            wg = tl.load(wg_ptr + k0, mask=km[:, None] & nm[None, :], other=0.0).to(dt)
            wu = tl.load(wg_ptr + I * H + k0, mask=km[:, None] & nm[None, :], other=0.0).to(dt)
            sg = tl.load(sg_ptr + k0 // BLK_K, mask=nm, other=0.0)
            su = tl.load(su_ptr + k0 // BLK_K, mask=nm, other=0.0)
            acc_g += tl.dot(x, wg, input_precision=PREC) * sg[None, :]
            acc_u += tl.dot(x, wu, input_precision=PREC) * su[None, :]
        gt = acc_g.to(dt).to(tl.float32)
        hv = (gt / (1.0 + tl.exp(-gt))).to(dt).to(tl.float32) * acc_u.to(dt).to(tl.float32)
        tl.store(h_ptr + r[:, None] * I + n[None, :], hv.to(dt), mask=nm[None, :])


@autotune(_GEMM_CONFIGS, key=["H", "I", "BM", "NBK"])
@triton.jit(do_not_specialize=["NBK"])
def _down_kernel(h_ptr, w_ptr, s_ptr, rows_ptr, be_ptr, rw_ptr, y_ptr, H, I, NBK,
                 BLK_N: tl.constexpr, BLK_K: tl.constexpr, PREC: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    e = tl.load(be_ptr + pm).to(tl.int64)
    if e >= 0:
        r = pm * BM + tl.arange(0, BM)
        a = tl.load(rows_ptr + r)
        valid = a >= 0
        n = pn * BN + tl.arange(0, BN)
        nm = n < H
        kk = tl.arange(0, BK)
        SN, SK = tl.cdiv(H, BLK_N), tl.cdiv(I, BLK_K)
        dt = y_ptr.dtype.element_ty
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        wd_ptr = w_ptr + e * H * I + n[None, :] * I + kk[:, None]                 # [BK, BN] = W_down^T
        sd_ptr = s_ptr + e * SN * SK + (n // BLK_N) * SK
        for k0 in range(0, I, BK):
            km = (k0 + kk) < I
            hv = tl.load(h_ptr + r[:, None] * I + (k0 + kk)[None, :], mask=km[None, :], other=0.0)
            wd = tl.load(wd_ptr + k0, mask=km[:, None] & nm[None, :], other=0.0).to(dt)
            sd = tl.load(sd_ptr + k0 // BLK_K, mask=nm, other=0.0)
            acc += tl.dot(hv, wd, input_precision=PREC) * sd[None, :]
        rw = tl.load(rw_ptr + tl.where(valid, a, 0), mask=valid, other=0.0).to(dt).to(tl.float32)
        y = acc.to(dt).to(tl.float32) * rw[:, None]
        tl.store(y_ptr + tl.where(valid, a, 0)[:, None] * H + n[None, :], y.to(dt), mask=valid[:, None] & nm[None, :])


@autotune(_GEMV_CONFIGS, key=["H", "I", "TB"])
@triton.jit(do_not_specialize=["TB"])
def _gemv_gate_up_kernel(x_ptr, w_ptr, s_ptr, ids_ptr, h_ptr, H, I, TB, TOPK: tl.constexpr,
                         BLK_N: tl.constexpr, BLK_K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    a = tl.program_id(0).to(tl.int64)                                 # assignment (token, choice)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nm = n < I
    e = tl.load(ids_ptr + a)
    tok = a // TOPK
    kk = tl.arange(0, BK)
    SN, SK = (2 * I) // BLK_N, tl.cdiv(H, BLK_K)
    acc_g = tl.zeros([BN, BK], dtype=tl.float32)
    acc_u = tl.zeros([BN, BK], dtype=tl.float32)
    wg_ptr = w_ptr + e * (2 * I) * H + n[:, None] * H + kk[None, :]   # [BN, BK] rows of W_gate
    sg_ptr = s_ptr + e * SN * SK + (n // BLK_N) * SK
    su_ptr = sg_ptr + (I // BLK_N) * SK
    for k0 in range(0, H, BK):
        km = (k0 + kk) < H
        xv = tl.load(x_ptr + tok * H + k0 + kk, mask=km, other=0.0).to(tl.float32)
        wg = tl.load(wg_ptr + k0, mask=nm[:, None] & km[None, :], other=0.0)
        wu = tl.load(wg_ptr + I * H + k0, mask=nm[:, None] & km[None, :], other=0.0)
        sg = tl.load(sg_ptr + k0 // BLK_K, mask=nm, other=0.0)
        su = tl.load(su_ptr + k0 // BLK_K, mask=nm, other=0.0)
        acc_g += wg.to(tl.float32) * sg[:, None] * xv[None, :]
        acc_u += wu.to(tl.float32) * su[:, None] * xv[None, :]
    dt = h_ptr.dtype.element_ty
    gt = tl.sum(acc_g, 1).to(dt).to(tl.float32)
    hv = (gt / (1.0 + tl.exp(-gt))).to(dt).to(tl.float32) * tl.sum(acc_u, 1).to(dt).to(tl.float32)
    tl.store(h_ptr + a * I + n, hv.to(dt), mask=nm)


@autotune(_GEMV_CONFIGS, key=["H", "I", "TB"])
@triton.jit(do_not_specialize=["TB"])
def _gemv_down_kernel(h_ptr, w_ptr, s_ptr, ids_ptr, rw_ptr, y_ptr, H, I, TB, TOPK: tl.constexpr,
                      BLK_N: tl.constexpr, BLK_K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nm = n < H
    kk = tl.arange(0, BK)
    SN, SK = tl.cdiv(H, BLK_N), tl.cdiv(I, BLK_K)
    dt = y_ptr.dtype.element_ty
    out = tl.zeros([BN], dtype=tl.float32)
    for j in range(TOPK):  # the token's k experts, in order
        a = t * TOPK + j
        e = tl.load(ids_ptr + a)
        acc = tl.zeros([BN, BK], dtype=tl.float32)
        wd_ptr = w_ptr + e * H * I + n[:, None] * I + kk[None, :]     # [BN, BK] rows of W_down
        sd_ptr = s_ptr + e * SN * SK + (n // BLK_N) * SK
        for k0 in range(0, I, BK):
            km = (k0 + kk) < I
            hv = tl.load(h_ptr + a * I + k0 + kk, mask=km, other=0.0).to(tl.float32)
            wd = tl.load(wd_ptr + k0, mask=nm[:, None] & km[None, :], other=0.0)
            sd = tl.load(sd_ptr + k0 // BLK_K, mask=nm, other=0.0)
            acc += wd.to(tl.float32) * sd[:, None] * hv[None, :]
        rw = tl.load(rw_ptr + a).to(dt).to(tl.float32)
        out += (tl.sum(acc, 1).to(dt).to(tl.float32) * rw).to(dt).to(tl.float32)
    tl.store(y_ptr + t * H + n, out.to(dt), mask=nm)


def moe_experts_fp8(x, gate_up_proj, gate_up_scale, down_proj, down_scale, weights, ids,
                    block: tuple[int, int] = (128, 128), *, block_m: int | None = None,
                    gemv: bool | None = None) -> torch.Tensor:
    """x [T, H]; gate_up_proj [E, 2I, H] fp8 + scale [E, 2I/bn, ceil(H/bk)]; down_proj [E, H, I] fp8
    + scale [E, ceil(H/bn), ceil(I/bk)]; weights/ids [T, k] -> [T, H]. `block_m` / `gemv` force a
    path (tests, benchmarks)."""
    T, H = x.shape
    E, I = gate_up_proj.shape[0], down_proj.shape[-1]
    k = ids.shape[1]
    bn, bk = block
    if I % bn or bk % 128:
        raise ValueError(f"fp8 experts need moe_intermediate_size ({I}) % {bn} == 0 and 128 | {bk}")
    if T == 0:
        return x.new_zeros(T, H)
    M = T * k
    x = x.contiguous()
    ids = ids.contiguous()
    if gemv if gemv is not None else (M <= GEMV_MAX_ROWS and block_m is None):
        h = torch.empty(M, I, dtype=x.dtype, device=x.device)
        TB = size_class(T)
        _gemv_gate_up_kernel[lambda meta: (M, triton.cdiv(I, meta["BN"]))](
            x, gate_up_proj, gate_up_scale, ids, h, H, I, TB, TOPK=k, BLK_N=bn, BLK_K=bk)
        out = torch.empty(T, H, dtype=x.dtype, device=x.device)
        _gemv_down_kernel[lambda meta: (T, triton.cdiv(H, meta["BN"]))](
            h, down_proj, down_scale, ids, weights.contiguous(), out, H, I, TB, TOPK=k, BLK_N=bn, BLK_K=bk)
        return out
    BM = block_m or (16 if M <= 16 * E else 64)
    rows, block_expert, NB = _align(ids, E, BM)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    NBK = size_class(NB)
    h = torch.empty(NB * BM, I, dtype=x.dtype, device=x.device)
    _gate_up_kernel[lambda meta: (NB, triton.cdiv(I, meta["BN"]))](
        x, gate_up_proj, gate_up_scale, rows, block_expert, h, H, I, NBK, TOPK=k, BLK_N=bn, BLK_K=bk, PREC=prec, BM=BM)
    y = torch.empty(M, H, dtype=x.dtype, device=x.device)
    _down_kernel[lambda meta: (NB, triton.cdiv(H, meta["BN"]))](
        h, down_proj, down_scale, rows, block_expert, weights.contiguous(), y, H, I, NBK, BLK_N=bn, BLK_K=bk,
        PREC=prec, BM=BM)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    BH = min(1024, pow2(H))
    _sum_k_kernel[(T, triton.cdiv(H, BH))](y, out, T, H, TOPK=k, BH=BH)
    return out
