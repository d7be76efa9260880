"""Triton MoE experts over block-FP8 weights: kernels/fp8.py's moe_experts_fp8, same signature,
optionally with the MoE block's gated shared expert (fp8 too) inside the same launches, as
triton/moe.py's moe_experts_shared does for bf16. The two paths of triton/moe.py (whose grouping
`align_blocks` (grouping + shared-expert rows) and the k-sum kernels are reused):

* few assignments (decode, M = T*k <= GEMV_MAX_ROWS): per (assignment, column block) GEMVs, weight
  only (w8a16; kernels in moe_fp8_gemv.py); the shared expert is one more assignment per token.
* otherwise the grouped GEMM over BM-row blocks of one expert's assignments, by default w8a8
  (`act_quant`, as vLLM / DeepSeek-V3 run block-FP8): the input rows are quantised per token and
  128-channel group (one small launch for x; the gate/up kernel quantises h in its epilogue, one
  128-wide column block per program) and the fp8 tiles go to the tensor cores as they are, the
  fp32 product scaled by (row scale x block scale) per 128-wide k step. `act_quant=False` widens
  each fp8 weight tile to bf16 instead (w8a16: no activation rounding, more ALU work per byte).
  The shared expert's rows (every token, in order, weighted by its sigmoid gate) go in blocks
  after the routed experts' as expert E. With SORTED_FP8, prefill-sized w8a8 calls without the
  shared expert take moe_tma_fp8.py's expert-sorted TMA kernels instead (no padded blocks).

Half the weight bytes of bf16: the decode step, which streams the routed experts, is where it pays.
Rounding follows the reference (products rounded to the activation dtype, then the gate, the
routing weight, the fp32 sum over k). Scale blocks must be 128 wide (BK divides them) and I a
multiple of the row block (gate and up rows never share a scale block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...env_switches import switch
from ._util import autotune, pow2, size_class
from .moe import GEMV_MAX_ROWS, _sum_k_kernel, _sum_shared_kernel, align_blocks
from .moe_fp8_gemv import _gemv_down_kernel, _gemv_gate_up_kernel

FP8_MAX = tl.constexpr(448.0)  # largest finite e4m3fn value
ACT_QUANT = True  # the grouped GEMM's default: w8a8 (False: w8a16); benchmarks flip it
# long-prefill w8a8 calls without a fused shared expert go to moe_tma_fp8.py's expert-sorted TMA
# GEMMs (sm90, >= moe_tma_fp8.MIN_ROWS rows; passed its H200 tests in session 4, 8K prefill of the
# 80B slice 28.7 ms vs bf16 31.1); env QWEN3NEXT_FP8_SORTED=0 turns it off at import, benchmarks
# flip the attribute
SORTED_FP8 = switch("QWEN3NEXT_FP8_SORTED") == "1"
_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
# (BN, BK, warps, stages); the first is the interpreter's. BK divides 128.
_GEMM_CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=st)
                 for bn, bk, w, st in ((32, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4),
                                       (64, 64, 4, 4))]
# w8a8 gate/up: BN = 128, one activation group of h per program
_A8_CONFIGS = [triton.Config({"BN": 128, "BK": bk}, num_warps=w, num_stages=st)
               for bk, w, st in ((128, 4, 3), (128, 8, 3), (64, 4, 4), (128, 4, 4), (128, 4, 5))]


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


@triton.jit(do_not_specialize=["NBK", "M"])
def _gate_up(x_ptr, xs_ptr, w_ptr, s_ptr, rows_ptr, be_ptr, h_ptr, hs_ptr, g8_ptr, gs_ptr, u8_ptr, us_ptr, M, H, I,
             IS, IH, SH_E, NBK, TOPK: tl.constexpr, BLK_N: tl.constexpr, BLK_K: tl.constexpr, A8: tl.constexpr,
             PREC: tl.constexpr, DT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Block pm of BM rows of one expert (the shared expert's gate / up [IS, H] when it is SH_E), BN
    columns -> h rows (row stride IH). Row a < M is routed assignment a (token a // TOPK), a >= M the
    shared expert of token a - M. A8: x is fp8 with per-(token, 128 channels) scales xs, and h
    leaves as fp8 + scales hs [rows, IH / 128]. DT: the activation dtype (products are rounded to
    it, as the reference rounds)."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    e = tl.load(be_ptr + pm).to(tl.int64)
    if e >= 0:
        SK = tl.cdiv(H, BLK_K)
        if e == SH_E:
            wg_base = g8_ptr
            wu_base = u8_ptr
            sg_base = gs_ptr
            su_base = us_ptr
            N = IS
        else:
            wg_base = w_ptr + e * (2 * I) * H
            wu_base = wg_base + I * H
            sg_base = s_ptr + e * ((2 * I) // BLK_N) * SK
            su_base = sg_base + (I // BLK_N) * SK
            N = I
        r = pm * BM + tl.arange(0, BM)
        a = tl.load(rows_ptr + r)
        valid = a >= 0
        tok = tl.where(valid, tl.where(a < M, a // TOPK, a - M), 0)
        n = pn * BN + tl.arange(0, BN)
        nm = n < N
        kk = tl.arange(0, BK)
        dt = DT
        acc_g = tl.zeros([BM, BN], dtype=tl.float32)
        acc_u = tl.zeros([BM, BN], dtype=tl.float32)
        wg_ptr = wg_base + n[None, :] * H + kk[:, None]                          # [BK, BN] = W_gate^T
        wu_ptr = wu_base + n[None, :] * H + kk[:, None]
        sg_ptr = sg_base + (n // BLK_N) * SK                                      # [BN] scale rows
        su_ptr = su_base + (n // BLK_N) * SK
        for k0 in range(0, H, BK):
            km = (k0 + kk) < H
            x = tl.load(x_ptr + tok[:, None] * H + (k0 + kk)[None, :], mask=valid[:, None] & km[None, :], other=0.0)
            wg = tl.load(wg_ptr + k0, mask=km[:, None] & nm[None, :], other=0.0)
            wu = tl.load(wu_ptr + k0, mask=km[:, None] & nm[None, :], other=0.0)
            sg = tl.load(sg_ptr + k0 // BLK_K, mask=nm, other=0.0)
            su = tl.load(su_ptr + k0 // BLK_K, mask=nm, other=0.0)
            if A8:  # fp8 x fp8 on the tensor cores; row scale x block scale on the fp32 product
                xs = tl.load(xs_ptr + tok * SK + k0 // 128, mask=valid, other=0.0)
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
            tl.store(h_ptr + r[:, None] * IH + n[None, :], q.to(h_ptr.dtype.element_ty), mask=nm[None, :])
            tl.store(hs_ptr + r * (IH // 128) + pn, sc)
        else:
            tl.store(h_ptr + r[:, None] * IH + n[None, :], hv, mask=nm[None, :])


@triton.jit(do_not_specialize=["NBK"])
def _down(h_ptr, hs_ptr, w_ptr, s_ptr, rows_ptr, be_ptr, rw_ptr, y_ptr, d8_ptr, ds_ptr, H, I, IS, IH, SH_E, NBK,
          BLK_N: tl.constexpr, BLK_K: tl.constexpr, A8: tl.constexpr, PREC: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Block pm (the shared expert's down [H, IS] when its expert is SH_E), BN columns of H -> y rows
    (row = assignment, weighted by rw[assignment])."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    e = tl.load(be_ptr + pm).to(tl.int64)
    if e >= 0:
        if e == SH_E:
            wd_base = d8_ptr
            K = IS
            SK = tl.cdiv(IS, BLK_K)
            sd_base = ds_ptr
        else:
            wd_base = w_ptr + e * H * I
            K = I
            SK = tl.cdiv(I, BLK_K)
            sd_base = s_ptr + e * tl.cdiv(H, BLK_N) * SK
        r = pm * BM + tl.arange(0, BM)
        a = tl.load(rows_ptr + r)
        valid = a >= 0
        n = pn * BN + tl.arange(0, BN)
        nm = n < H
        kk = tl.arange(0, BK)
        dt = y_ptr.dtype.element_ty
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        wd_ptr = wd_base + n[None, :] * K + kk[:, None]                           # [BK, BN] = W_down^T
        sd_ptr = sd_base + (n // BLK_N) * SK
        for k0 in range(0, K, BK):
            km = (k0 + kk) < K
            hv = tl.load(h_ptr + r[:, None] * IH + (k0 + kk)[None, :], mask=km[None, :], other=0.0)
            wd = tl.load(wd_ptr + k0, mask=km[:, None] & nm[None, :], other=0.0)
            sd = tl.load(sd_ptr + k0 // BLK_K, mask=nm, other=0.0)
            if A8:
                hsc = tl.load(hs_ptr + r * (IH // 128) + k0 // 128)
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


def _gemv(x, gate_up_proj, gate_up_scale, down_proj, down_scale, weights, ids, block, shared):
    """The few-row path: per-assignment GEMVs (+ the gated shared expert as one more assignment per
    token), one launch up, one per term down, an ordered fp32 sum of each token's terms."""
    T, H = x.shape
    I, k = down_proj.shape[-1], ids.shape[1]
    M = T * k
    TB = size_class(T)
    h = torch.empty(M, I, dtype=x.dtype, device=x.device)
    if shared is None:  # never read, but typed as the shared expert's tensors would be
        g8, gs, u8, us, d8, ds, sgw = gate_up_proj, gate_up_scale, gate_up_proj, gate_up_scale, down_proj, down_scale, x
        IS, hs, NS = I, h, 0
    else:
        g8, gs, u8, us, d8, ds, sgw = shared
        IS, NS = g8.shape[0], 1
        hs = torch.empty(T, IS, dtype=x.dtype, device=x.device)
    bn, bk = block
    _gemv_gate_up_kernel[lambda meta: (M + NS * T, triton.cdiv(max(I, IS), meta["BN"]))](
        x, gate_up_proj, gate_up_scale, ids, h, g8, gs, u8, us, hs, M, H, I, IS, TB, TOPK=k, BLK_N=bn, BLK_K=bk)
    y = torch.empty(T, k + NS, H, dtype=x.dtype, device=x.device)
    _gemv_down_kernel[lambda meta: (M + NS * T, triton.cdiv(H, meta["BN"]))](
        h, down_proj, down_scale, ids, weights.contiguous(), y, hs, d8, ds, x, sgw, M, H, I, IS, TB, TOPK=k, NS=NS,
        BLK_N=bn, BLK_K=bk)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    BH = min(1024, pow2(H))
    _sum_k_kernel[(T, triton.cdiv(H, BH))](y, out, T, H, TOPK=k + NS, BH=BH)
    return out


def _grouped(x, gate_up_proj, gate_up_scale, down_proj, down_scale, weights, ids, block, shared, act_quant,
             block_m):
    """The grouped-GEMM path; with `shared` the shared expert joins as expert E (its rows need no
    grouping: blocks after the routed ones, weighted by its sigmoid gate)."""
    T, H = x.shape
    E, I = gate_up_proj.shape[0], down_proj.shape[-1]
    k = ids.shape[1]
    M = T * k
    bn, bk = block
    BM = block_m or (16 if M <= 16 * E else 64)
    if shared is None:  # never read, but typed as the shared expert's tensors would be (Triton checks)
        g8, gs, u8, us, d8, ds = gate_up_proj, gate_up_scale, gate_up_proj, gate_up_scale, down_proj, down_scale
        IS, SH_E, NS = I, -1, 0
        rows, block_expert, NB, weights = align_blocks(x, weights, ids, E, BM)
    else:
        g8, gs, u8, us, d8, ds, sgw = shared
        IS, SH_E, NS = g8.shape[0], E, 1
        rows, block_expert, NB, weights = align_blocks(x, weights, ids, E, BM, sgw)
    IH = max(I, IS)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    NBK = size_class(NB)
    if act_quant:
        xa, xs = quantize_act(x)
        h = torch.empty(NB * BM, IH, dtype=torch.float8_e4m3fn, device=x.device)
        hs = torch.empty(NB * BM, IH // 128, dtype=torch.float32, device=x.device)
        up, down = _gate_up_a8_kernel, _down_a8_kernel
    else:  # xs, hs: unused
        xa = xs = x
        h = hs = torch.empty(NB * BM, IH, dtype=x.dtype, device=x.device)
        up, down = _gate_up_kernel, _down_kernel
    up[lambda meta: (NB, triton.cdiv(IH, meta["BN"]))](
        xa, xs, gate_up_proj, gate_up_scale, rows, block_expert, h, hs, g8, gs, u8, us, M, H, I, IS, IH, SH_E, NBK,
        TOPK=k, BLK_N=bn, BLK_K=bk, A8=act_quant, PREC=prec, DT=_TL_DTYPE[x.dtype], BM=BM)
    y = torch.empty(M + NS * T, H, dtype=x.dtype, device=x.device)
    down[lambda meta: (NB, triton.cdiv(H, meta["BN"]))](
        h, hs, down_proj, down_scale, rows, block_expert, weights, y, d8, ds, H, I, IS, IH, SH_E, NBK, BLK_N=bn,
        BLK_K=bk, A8=act_quant, PREC=prec, BM=BM)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    BH = min(1024, pow2(H))
    if shared is None:
        _sum_k_kernel[(T, triton.cdiv(H, BH))](y, out, T, H, TOPK=k, BH=BH)
    else:
        _sum_shared_kernel[(T, triton.cdiv(H, BH))](y, out, T, H, M, TOPK=k, BH=BH)
    return out


def moe_experts_fp8(x, gate_up_proj, gate_up_scale, down_proj, down_scale, weights, ids,
                    block: tuple[int, int] = (128, 128), act_quant: bool | None = None, *, shared=None,
                    block_m: int | None = None, gemv: bool | None = None, gated=None) -> torch.Tensor:
    """x [T, H]; gate_up_proj [E, 2I, H] fp8 + scale [E, 2I/bn, ceil(H/bk)]; down_proj [E, H, I] fp8
    + scale [E, ceil(H/bn), ceil(I/bk)]; weights/ids [T, k] -> [T, H]. `shared` = (gate_proj
    [Is, H] fp8, scale, up_proj, scale, down_proj [H, Is] fp8, scale, shared_expert_gate [1, H] in
    x's dtype): the MoE block's gated shared expert added (kernels/fp8.py). `act_quant`: the
    grouped GEMM in w8a8 (None: ACT_QUANT; the GEMV path is always w8a16). `block_m` / `gemv` force
    a path (tests, benchmarks). `gated` = (sh [T, H], g [T, 1]), a shared expert computed outside:
    + sigmoid(g) * sh (in the k-sum's pass on the expert-sorted path)."""
    T, H = x.shape
    I = down_proj.shape[-1]
    bn, bk = block
    if I % bn or bk % 128 or I % 128:
        raise ValueError(f"fp8 experts need moe_intermediate_size ({I}) % {bn} == 0 and 128 | {bk}")
    if shared is not None:
        if shared[0].shape[0] % 128:
            raise ValueError(f"fused fp8 shared expert needs shared_expert_intermediate_size "
                             f"({shared[0].shape[0]}) % 128 == 0")
        shared = tuple(t.contiguous() for t in shared)
    if T == 0:
        return x.new_zeros(T, H)
    x = x.contiguous()
    ids = ids.contiguous()
    if gemv if gemv is not None else (T * ids.shape[1] <= GEMV_MAX_ROWS and block_m is None):
        out = _gemv(x, gate_up_proj, gate_up_scale, down_proj, down_scale, weights, ids, block, shared)
        return out if gated is None else out + torch.sigmoid(gated[1]) * gated[0]
    act_quant = ACT_QUANT if act_quant is None else act_quant
    if SORTED_FP8 and act_quant and shared is None and block_m is None:
        from . import moe_tma_fp8  # (imports this module)

        if moe_tma_fp8.suits(x, gate_up_proj, down_proj, block, T * ids.shape[1]):
            return moe_tma_fp8.moe_experts_sorted_fp8(x, gate_up_proj, gate_up_scale, down_proj, down_scale,
                                                      weights, ids, gated=gated)
    out = _grouped(x, gate_up_proj, gate_up_scale, down_proj, down_scale, weights, ids, block, shared, act_quant,
                   block_m)
    return out if gated is None else out + torch.sigmoid(gated[1]) * gated[0]
