"""Triton MoE experts over block-FP8 weights: kernels/fp8.py's moe_experts_fp8, same signature.
The two paths of triton/moe.py (whose grouping `_align` and k-sum kernel are reused):

* few assignments (decode, M = T*k <= GEMV_MAX_ROWS): per (assignment, column block) GEMVs, weight
  only (w8a16); each weight tile is read as fp8, widened in registers and multiplied by its
  128x128 block's scale.
* otherwise the grouped GEMM over BM-row blocks of one expert's assignments, by default w8a8
  (`act_quant`, as vLLM / DeepSeek-V3 run block-FP8): the input rows are quantised per token and
  128-channel group (one small launch for x; the gate/up kernel quantises h in its epilogue, one
  128-wide column block per program) and the fp8 tiles go to the tensor cores as they are, the
  fp32 product scaled by (row scale x block scale) per 128-wide k step. `act_quant=False` widens
  each fp8 weight tile to bf16 instead (w8a16: no activation rounding, more ALU work per byte).

Half the weight bytes of bf16: the decode step, which streams the routed experts, is where it pays.
Rounding follows the reference (products rounded to the activation dtype, then the gate, the
routing weight, the fp32 sum over k). Scale blocks must be 128 wide (BK divides them) and I a
multiple of the row block (gate and up rows never share a scale block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import autotune, pow2, size_class
from .moe import GEMV_MAX_ROWS, _align, _sum_k_kernel

FP8_MAX = tl.constexpr(448.0)  # largest finite e4m3fn value
ACT_QUANT = True  # the grouped GEMM's default: w8a8 (False: w8a16); benchmarks flip it
_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
# (BN, BK, warps, stages); the first is the interpreter's. BK divides 128.
_GEMM_CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=st)
                 for bn, bk, w, st in ((32, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4),
                                       (64, 64, 4, 4))]
# w8a8 gate/up: BN = 128, one activation group of h per program
_A8_CONFIGS = [triton.Config({"BN": 128, "BK": bk}, num_warps=w, num_stages=st)
               for bk, w, st in ((128, 4, 3), (128, 8, 3), (64, 4, 4), (128, 4, 4))]
_GEMV_CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w)
                 for bn, bk, w in ((16, 128, 4), (8, 128, 4), (32, 128, 4), (16, 128, 8))]


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, SK, G: tl.constexpr):
    """One token's group of G channels -> fp8 values and their scale max|x| / 448."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * G + tl.arange(0, G)
    m = c < K
    x = tl.load(x_ptr + row * K + c, mask=m, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), 0)
    sc = tl.where(amax > 0, amax / FP8_MAX, 1.0)
    q = tl.minimum(tl.maximum(x / sc, -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + row * K + c, q.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + row * SK + tl.program_id(1), sc)


def quantize_act(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x8 [M, K] fp8, scale [M, ceil(K/group)] fp32): kernels/fp8.quantize_act."""
    M, K = x.shape
    SK = triton.cdiv(K, group)
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    sc = torch.empty(M, SK, dtype=torch.float32, device=x.device)
    if M:
        _act_quant_kernel[(M, SK)](x.contiguous(), q, sc, K, SK, G=group)
    return q, sc


@triton.jit(do_not_specialize=["NBK"])
def _gate_up(x_ptr, xs_ptr, w_ptr, s_ptr, rows_ptr, be_ptr, h_ptr, hs_ptr, H, I, NBK, TOPK: tl.constexpr,
             BLK_N: tl.constexpr, BLK_K: tl.constexpr, A8: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """A8: x is fp8 with per-(token, 128 channels) scales xs, and h leaves as fp8 + scales hs.
    DT: the activation dtype (products are rounded to it, as the reference rounds)."""
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
        dt = DT
        acc_g = tl.zeros([BM, BN], dtype=tl.float32)
        acc_u = tl.zeros([BM, BN], dtype=tl.float32)
        wg_ptr = w_ptr + e * (2 * I) * H + n[None, :] * H + kk[:, None]          # [BK, BN] = W_gate^T
        sg_ptr = s_ptr + e * SN * SK + (n // BLK_N) * SK                          # [BN] scale rows
        su_ptr = sg_ptr + (I // BLK_N) * SK
        for k0 in range(0, H, BK):
            km = (k0 + kk) < H
            x = tl.load(x_ptr + tok[:, None] * H + (k0 + kk)[None, :], mask=valid[:, None] & km[None, :], other=0.0)
            wg = tl.load(wg_ptr + k0, mask=km[:, None] & nm[None, :], other=0.0)
            wu = tl.load(wg_ptr + I * H + k0, mask=km[:, None] & nm[None, :], other=0.0)
            sg = tl.load(sg_ptr + k0 // BLK_K, mask=nm, other=0.0)
            su = tl.load(su_ptr + k0 // BLK_K, mask=nm, other=0.0)
            if A8:  # fp8 x fp8 on the tensor cores; row scale x block scale on the fp32 product
                xs = tl.load(xs_ptr + tok * SK + k0 // BLK_K, mask=valid, other=0.0)
                acc_g += tl.dot(x, wg) * (xs[:, None] * sg[None, :])
                acc_u += tl.dot(x, wu) * (xs[:, None] * su[None, :])
            else:
                acc_g += tl.dot(x, wg.to(dt), input_precision=PREC) * sg[None, :]
                acc_u += tl.dot(x, wu.to(dt), input_precision=PREC) * su[None, :]
        gt = acc_g.to(dt).to(tl.float32)
        hv = ((gt / (1.0 + tl.exp(-gt))).to(dt).to(tl.float32) * acc_u.to(dt).to(tl.float32)).to(dt)
        if A8:  # BN = 128: this program's columns are one activation group of each row
            hf = hv.to(tl.float32)
            amax = tl.max(tl.abs(hf), 1)
            sc = tl.where(amax > 0, amax / FP8_MAX, 1.0)
            q = tl.minimum(tl.maximum(hf / sc[:, None], -FP8_MAX), FP8_MAX)
            tl.store(h_ptr + r[:, None] * I + n[None, :], q.to(h_ptr.dtype.element_ty), mask=nm[None, :])
            tl.store(hs_ptr + r * (I // BN) + pn, sc)
        else:
            tl.store(h_ptr + r[:, None] * I + n[None, :], hv, mask=nm[None, :])


@triton.jit(do_not_specialize=["NBK"])
def _down(h_ptr, hs_ptr, w_ptr, s_ptr, rows_ptr, be_ptr, rw_ptr, y_ptr, H, I, NBK,
          BLK_N: tl.constexpr, BLK_K: tl.constexpr, A8: tl.constexpr, PREC: tl.constexpr,
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
            wd = tl.load(wd_ptr + k0, mask=km[:, None] & nm[None, :], other=0.0)
            sd = tl.load(sd_ptr + k0 // BLK_K, mask=nm, other=0.0)
            if A8:
                hsc = tl.load(hs_ptr + r * SK + k0 // BLK_K)
                acc += tl.dot(hv, wd) * (hsc[:, None] * sd[None, :])
            else:
                acc += tl.dot(hv, wd.to(dt), input_precision=PREC) * sd[None, :]
        rw = tl.load(rw_ptr + tl.where(valid, a, 0), mask=valid, other=0.0).to(dt).to(tl.float32)
        y = acc.to(dt).to(tl.float32) * rw[:, None]
        tl.store(y_ptr + tl.where(valid, a, 0)[:, None] * H + n[None, :], y.to(dt), mask=valid[:, None] & nm[None, :])


_KEY = ["H", "I", "BM", "NBK"]
_gate_up_kernel = autotune(_GEMM_CONFIGS, key=_KEY)(_gate_up)
_gate_up_a8_kernel = autotune(_A8_CONFIGS, key=_KEY)(_gate_up)
_down_kernel = autotune(_GEMM_CONFIGS, key=_KEY)(_down)
_down_a8_kernel = autotune(_GEMM_CONFIGS, key=_KEY)(_down)


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
                    block: tuple[int, int] = (128, 128), act_quant: bool | None = None, *, block_m: int | None = None,
                    gemv: bool | None = None) -> torch.Tensor:
    """x [T, H]; gate_up_proj [E, 2I, H] fp8 + scale [E, 2I/bn, ceil(H/bk)]; down_proj [E, H, I] fp8
    + scale [E, ceil(H/bn), ceil(I/bk)]; weights/ids [T, k] -> [T, H]. `act_quant`: the grouped
    GEMM in w8a8 (None: ACT_QUANT; the GEMV path is always w8a16). `block_m` / `gemv` force a path
    (tests, benchmarks)."""
    T, H = x.shape
    E, I = gate_up_proj.shape[0], down_proj.shape[-1]
    k = ids.shape[1]
    bn, bk = block
    if I % bn or bk % 128 or I % 128:
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
    act_quant = ACT_QUANT if act_quant is None else act_quant
    BM = block_m or (16 if M <= 16 * E else 64)
    rows, block_expert, NB = _align(ids, E, BM)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    NBK = size_class(NB)
    if act_quant:
        xa, xs = quantize_act(x)
        h = torch.empty(NB * BM, I, dtype=torch.float8_e4m3fn, device=x.device)
        hs = torch.empty(NB * BM, I // 128, dtype=torch.float32, device=x.device)
        up, down = _gate_up_a8_kernel, _down_a8_kernel
    else:  # xs, hs: unused
        xa = xs = x
        h = hs = torch.empty(NB * BM, I, dtype=x.dtype, device=x.device)
        up, down = _gate_up_kernel, _down_kernel
    up[lambda meta: (NB, triton.cdiv(I, meta["BN"]))](
        xa, xs, gate_up_proj, gate_up_scale, rows, block_expert, h, hs, H, I, NBK, TOPK=k,
        BLK_N=bn, BLK_K=bk, A8=act_quant, PREC=prec, DT=_TL_DTYPE[x.dtype], BM=BM)
    y = torch.empty(M, H, dtype=x.dtype, device=x.device)
    down[lambda meta: (NB, triton.cdiv(H, meta["BN"]))](
        h, hs, down_proj, down_scale, rows, block_expert, weights.contiguous(), y, H, I, NBK, BLK_N=bn, BLK_K=bk,
        A8=act_quant, PREC=prec, BM=BM)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    BH = min(1024, pow2(H))
    _sum_k_kernel[(T, triton.cdiv(H, BH))](y, out, T, H, TOPK=k, BH=BH)
    return out
