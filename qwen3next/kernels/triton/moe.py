"""Triton MoE: routing (softmax -> top-k -> renormalise) and the routed experts over the stacked
expert weights (tile sizes autotuned per shape on the GPU).

Same signatures as kernels/moe.py. Two paths for the experts:
* few assignments (decode, M = T*k <= GEMV_MAX_ROWS): no grouping at all (kernels in
  moe_gemv.py). One launch computes h = silu(x W_gate^T) * (x W_up^T) per (assignment, column
  block), a second w_j h_j W_down^T per (assignment, column block), a third each token's sum over
  its k terms (fp32, in a fixed order); weight streaming is all that costs, and an expert picked
  twice is read twice (fine while M is small).
* otherwise a grouped GEMM: the (token, k) assignments are sorted by expert and each expert's run
  padded to a multiple of BM rows (three small launches, no sort and no host sync, so decode can
  be graph-captured); one launch computes the gated product per BM-row block of one expert, a
  second multiplies by W_down^T and the routing weight, a third sums each token's k rows in fp32.
  Blocks past the real ones exit at once. BM = 16 when experts see few tokens, 64 for big batches.
`moe_experts_shared` adds the MoE block's gated shared expert: one more GEMV assignment per token,
or in the grouped GEMM its rows (every token, in order) in blocks after the routed experts'.
Rounding follows the reference (products in the activation dtype, then the gate, the routing
weight, and the fp32 sum over k).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import autotune, pow2, size_class
from .moe_gemv import _gemv_down_kernel, _gemv_gate_up_kernel, _shared_gate

# (BN, BK, warps, stages); the first is the interpreter's
_GEMM_CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=st)
                 for bn, bk, w, st in ((32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3),
                                       (128, 64, 4, 4), (32, 128, 4, 4), (128, 64, 4, 3), (256, 64, 8, 3),
                                       (128, 128, 8, 3), (256, 64, 8, 4), (128, 64, 8, 4), (64, 64, 4, 5))]
GEMV_MAX_ROWS = 80  # M = T*k up to this uses the GEMV path (measured: T = 8 still gains at k = 10)
# the MoE block hands its shared expert to the experts' kernels up to this many routed rows (decode,
# verify); prefill-sized batches keep it in cuBLAS (not measured against the grouped GEMM there)
SHARED_MAX_ROWS = 4096


@autotune([triton.Config({}, num_warps=w) for w in (4, 1, 2, 8)], key=["E", "TB"])
@triton.jit(do_not_specialize=["TB"])
def _route_kernel(logit_ptr, w_ptr, id_ptr, E, TB, TOPK: tl.constexpr, KP: tl.constexpr, RENORM: tl.constexpr,
                  BE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BE)
    x = tl.load(logit_ptr + t * E + e, mask=e < E, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = p / tl.sum(p, 0)
    p = tl.where(e < E, p, -1.0)
    jj = tl.arange(0, KP)
    wv = tl.zeros([KP], dtype=tl.float32)
    iv = tl.zeros([KP], dtype=tl.int64)
    for j in tl.static_range(TOPK):
        best = tl.max(p, 0)
        idx = tl.min(tl.where(p == best, e, BE), 0)                    # lowest index among ties
        idx = tl.minimum(idx, E - 1)  # NaN logits match nothing: keep the id a valid expert
        wv = tl.where(jj == j, best, wv)
        iv = tl.where(jj == j, idx.to(tl.int64), iv)
        p = tl.where(e == idx, -1.0, p)
    if RENORM:
        wv = wv / tl.sum(wv, 0)
    tl.store(w_ptr + t * TOPK + jj, wv, mask=jj < TOPK)
    tl.store(id_ptr + t * TOPK + jj, iv, mask=jj < TOPK)


def moe_route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """router_logits [T, E] -> (weights [T, k] fp32, ids [T, k] long)."""
    T, E = router_logits.shape
    w = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=router_logits.device)
    if T:
        _route_kernel[(T,)](router_logits.contiguous(), w, ids, E, size_class(T), TOPK=top_k, KP=pow2(top_k, 2),
                            RENORM=norm_topk_prob, BE=pow2(E))
    return w, ids


@triton.jit(do_not_specialize=["M"])
def _count_kernel(ids_ptr, cnt_ptr, rank_ptr, M, BLK: tl.constexpr):
    a = tl.program_id(0) * BLK + tl.arange(0, BLK)
    m = a < M
    e = tl.load(ids_ptr + a, mask=m, other=0)
    # the old count is this assignment's rank among its expert's rows (any order will do: each
    # row of a GEMM tile is computed independently of the others)
    r = tl.atomic_add(cnt_ptr + e, 1, mask=m)
    tl.store(rank_ptr + a, r, mask=m)


@triton.jit(do_not_specialize=["NB"])
def _blocks_kernel(cnt_ptr, pst_ptr, be_ptr, rows_ptr, E, NB,
                   BM: tl.constexpr, BE: tl.constexpr, BLKB: tl.constexpr):
    e = tl.arange(0, BE)
    em = e < E
    cnt = tl.load(cnt_ptr + e, mask=em, other=0)
    padded = (cnt + BM - 1) // BM * BM
    pend = tl.cumsum(padded, 0)
    pst = pend - padded                                               # first padded row per expert
    if tl.program_id(0) == 0:
        tl.store(pst_ptr + e, pst, mask=em)
    b = tl.program_id(0) * BLKB + tl.arange(0, BLKB)                  # blocks of this program
    bm = b < NB
    start = b * BM
    eb = tl.sum(((pend[None, :] <= start[:, None]) & em[None, :]).to(tl.int32), 1)   # expert of block
    valid = eb < E
    tl.store(be_ptr + b, tl.where(valid, eb, -1), mask=bm)
    sel = e[None, :] == eb[:, None]
    real_end = tl.sum(tl.where(sel, pst + cnt, 0), 1)                 # end of the expert's real rows
    r = start[:, None] + tl.arange(0, BM)[None, :]                    # [BLKB, BM] row index
    pad = (r >= real_end[:, None]) | (~valid)[:, None]
    tl.store(rows_ptr + r, tl.full([BLKB, BM], -1, tl.int64), mask=bm[:, None] & pad)


@triton.jit(do_not_specialize=["M"])
def _place_kernel(ids_ptr, rank_ptr, pst_ptr, rows_ptr, M, BLK: tl.constexpr):
    a = tl.program_id(0) * BLK + tl.arange(0, BLK)
    m = a < M
    e = tl.load(ids_ptr + a, mask=m, other=0)
    pos = tl.load(pst_ptr + e, mask=m, other=0) + tl.load(rank_ptr + a, mask=m, other=0)
    tl.store(rows_ptr + pos, a.to(tl.int64), mask=m)


def _align(ids: torch.Tensor, E: int, BM: int, extra_blocks: int = 0):
    """Group assignments by expert, each expert's run padded to BM rows (three small launches,
    no host sync, no sort).

    -> rows [NB*BM] (assignment index, -1 = padding), block_expert [NB] (-1 = unused block), NB.
    `extra_blocks` more blocks are allocated at the end, left for the caller to fill.
    """
    M = ids.numel()
    flat = ids.reshape(-1).contiguous()
    dev = ids.device
    NB = triton.cdiv(M, BM) + min(E, M)  # each used expert wastes less than one block
    counts = torch.zeros(E, dtype=torch.int64, device=dev)
    rank = torch.empty(M, dtype=torch.int64, device=dev)
    pst = torch.empty(E, dtype=torch.int64, device=dev)
    rows = torch.empty((NB + extra_blocks) * BM, dtype=torch.int64, device=dev)
    block_expert = torch.empty(NB + extra_blocks, dtype=torch.int64, device=dev)
    BLK, BLKB = 256, 32
    _count_kernel[(triton.cdiv(M, BLK),)](flat, counts, rank, M, BLK=BLK)
    _blocks_kernel[(triton.cdiv(NB, BLKB),)](counts, pst, block_expert, rows, E, NB, BM=BM, BE=pow2(E), BLKB=BLKB)
    _place_kernel[(triton.cdiv(M, BLK),)](flat, rank, pst, rows, M, BLK=BLK)
    return rows, block_expert, NB + extra_blocks


@autotune(_GEMM_CONFIGS, key=["H", "I", "BM", "NBK"])
@triton.jit(do_not_specialize=["NBK", "M"])
def _gate_up_kernel(x_ptr, w_ptr, rows_ptr, be_ptr, h_ptr, sg_ptr, su_ptr, M, H, I, IS, IH, SH_E, NBK,
                    TOPK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Block pm of BM rows of one expert (the shared expert's [IS, H] gate / up when it is SH_E),
    BN columns -> h rows (row stride IH). Row a < M is routed assignment a (token a // TOPK), a >= M
    the shared expert of token a - M."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    e = tl.load(be_ptr + pm).to(tl.int64)
    if e >= 0:
        if e == SH_E:
            wg_base = sg_ptr
            wu_base = su_ptr
            N = IS
        else:
            wg_base = w_ptr + e * (2 * I) * H
            wu_base = wg_base + I * H
            N = I
        r = pm * BM + tl.arange(0, BM)
        a = tl.load(rows_ptr + r)
        valid = a >= 0
        tok = tl.where(valid, tl.where(a < M, a // TOPK, a - M), 0)
        n = pn * BN + tl.arange(0, BN)
        nm = n < N
        kk = tl.arange(0, BK)
        acc_g = tl.zeros([BM, BN], dtype=tl.float32)
        acc_u = tl.zeros([BM, BN], dtype=tl.float32)
        wg_ptr = wg_base + n[None, :] * H + kk[:, None]                          # [BK, BN] = W_gate^T
        wu_ptr = wu_base + n[None, :] * H + kk[:, None]
        for k0 in range(0, H, BK):
            km = (k0 + kk) < H
            x = tl.load(x_ptr + tok[:, None] * H + (k0 + kk)[None, :], mask=valid[:, None] & km[None, :], other=0.0)
            wg = tl.load(wg_ptr + k0, mask=km[:, None] & nm[None, :], other=0.0)
            wu = tl.load(wu_ptr + k0, mask=km[:, None] & nm[None, :], other=0.0)
            acc_g = tl.dot(x, wg, acc_g, input_precision=PREC)
            acc_u = tl.dot(x, wu, acc_u, input_precision=PREC)
        dt = h_ptr.dtype.element_ty
        # round like the reference (products in the activation dtype, then the gate)
        gt = acc_g.to(dt).to(tl.float32)
        hv = (gt / (1.0 + tl.exp(-gt))).to(dt).to(tl.float32) * acc_u.to(dt).to(tl.float32)
        tl.store(h_ptr + r[:, None] * IH + n[None, :], hv.to(dt), mask=nm[None, :])


@autotune(_GEMM_CONFIGS, key=["H", "I", "BM", "NBK"])
@triton.jit(do_not_specialize=["NBK"])
def _down_kernel(h_ptr, w_ptr, rows_ptr, be_ptr, rw_ptr, y_ptr, sd_ptr, H, I, IS, IH, SH_E, NBK,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    e = tl.load(be_ptr + pm).to(tl.int64)
    if e >= 0:
        if e == SH_E:
            wd_base = sd_ptr
            K = IS
        else:
            wd_base = w_ptr + e * H * I
            K = I
        r = pm * BM + tl.arange(0, BM)
        a = tl.load(rows_ptr + r)
        valid = a >= 0
        n = pn * BN + tl.arange(0, BN)
        nm = n < H
        kk = tl.arange(0, BK)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        wd_ptr = wd_base + n[None, :] * K + kk[:, None]                           # [BK, BN] = W_down^T
        for k0 in range(0, K, BK):
            km = (k0 + kk) < K
            hv = tl.load(h_ptr + r[:, None] * IH + (k0 + kk)[None, :], mask=km[None, :], other=0.0)
            wd = tl.load(wd_ptr + k0, mask=km[:, None] & nm[None, :], other=0.0)
            acc = tl.dot(hv, wd, acc, input_precision=PREC)
        dt = y_ptr.dtype.element_ty
        rw = tl.load(rw_ptr + tl.where(valid, a, 0), mask=valid, other=0.0).to(dt).to(tl.float32)
        y = acc.to(dt).to(tl.float32) * rw[:, None]
        tl.store(y_ptr + tl.where(valid, a, 0)[:, None] * H + n[None, :], y.to(dt), mask=valid[:, None] & nm[None, :])


@triton.jit(do_not_specialize=["T", "M", "B0", "NBS"])
def _shared_rows_kernel(w_ptr, x_ptr, sgw_ptr, w_out, rows_ptr, be_ptr, T, H, E, M, B0, NBS,
                        TOPK: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Token t's shared-expert row of the grouped GEMM: assignment M + t with weight sigmoid(x . w_sg)
    (w_out [M + T] = the routing weights, then the gates), placed at row t of the NBS blocks from
    block B0 (block expert E; rows past T are padding)."""
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, KP)
    jm = j < TOPK
    tl.store(w_out + t * TOPK + j, tl.load(w_ptr + t * TOPK + j, mask=jm, other=0.0), mask=jm)
    tl.store(w_out + M + t, _shared_gate(x_ptr + t * H, sgw_ptr, H, x_ptr.dtype.element_ty, BK))
    r0 = B0 * BM
    tl.store(rows_ptr + r0 + t, M + t)
    if t % BM == 0:
        tl.store(be_ptr + B0 + t // BM, t * 0 + E)  # (int64 like t)
    if t == T - 1:
        i = T + tl.arange(0, BM)
        tl.store(rows_ptr + r0 + i, tl.full([BM], -1, tl.int64), mask=i < NBS * BM)


@triton.jit(do_not_specialize=["T", "M"])
def _sum_shared_kernel(y_ptr, o_ptr, T, H, M, TOPK: tl.constexpr, BH: tl.constexpr):
    """out[t] = sum of y rows t*TOPK + j (j < TOPK), then y row M + t (the shared expert), in fp32."""
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BH + tl.arange(0, BH)
    cm = c < H
    acc = tl.zeros([BH], dtype=tl.float32)
    for j in range(TOPK):
        acc += tl.load(y_ptr + (t * TOPK + j) * H + c, mask=cm, other=0.0).to(tl.float32)
    acc += tl.load(y_ptr + (M + t) * H + c, mask=cm, other=0.0).to(tl.float32)
    tl.store(o_ptr + t * H + c, acc.to(o_ptr.dtype.element_ty), mask=cm)


@triton.jit(do_not_specialize=["T"])
def _sum_k_kernel(y_ptr, o_ptr, T, H, TOPK: tl.constexpr, BH: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BH + tl.arange(0, BH)
    cm = c < H
    acc = tl.zeros([BH], dtype=tl.float32)
    for j in range(TOPK):
        acc += tl.load(y_ptr + (t * TOPK + j) * H + c, mask=cm, other=0.0).to(tl.float32)
    tl.store(o_ptr + t * H + c, acc.to(o_ptr.dtype.element_ty), mask=cm)


def _gemv(x, gate_up_proj, down_proj, weights, ids, shared):
    """The few-row path: per-assignment GEMVs (+ the gated shared expert as one more assignment per
    token when `shared` = (gate_proj [Is, H], up_proj [Is, H], down_proj [H, Is], gate [1, H])),
    one launch up, one per term down, an ordered fp32 sum of each token's terms."""
    T, H = x.shape
    I, k = down_proj.shape[-1], ids.shape[1]
    M = T * k
    TB = size_class(T)
    h = torch.empty(M, I, dtype=x.dtype, device=x.device)
    if shared is None:
        sg = su = sd = sgw = gate_up_proj  # never read
        IS, hs, NS = I, h, 0
    else:
        sg, su, sd, sgw = (w.contiguous() for w in shared)
        IS, NS = sg.shape[0], 1
        hs = torch.empty(T, IS, dtype=x.dtype, device=x.device)
    _gemv_gate_up_kernel[lambda meta: (M + NS * T, triton.cdiv(max(I, IS), meta["BN"]))](
        x, gate_up_proj, ids, h, sg, su, hs, M, H, I, IS, TB, TOPK=k)
    y = torch.empty(T, k + NS, H, dtype=x.dtype, device=x.device)
    _gemv_down_kernel[lambda meta: (M + NS * T, triton.cdiv(H, meta["BN"]))](
        h, down_proj, ids, weights.contiguous(), y, hs, sd, x, sgw, M, H, I, IS, TB, TOPK=k, NS=NS)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    BH = min(1024, pow2(H))
    _sum_k_kernel[(T, triton.cdiv(H, BH))](y, out, T, H, TOPK=k + NS, BH=BH)
    return out


def align_blocks(x, weights, ids, E: int, BM: int, shared_gate: torch.Tensor | None = None):
    """Rows grouped into BM-row blocks per expert -> (rows, block_expert, NB, per-row weights).
    With `shared_gate` ([1, H], the shared expert's gate) the shared expert joins as expert E: its
    rows (every token, in order, weighted by its sigmoid gate) need no grouping and go in blocks
    after the routed ones; the weights then hold the routed rows' and its rows' (fp32)."""
    T, k = ids.shape
    weights = weights.contiguous()
    if shared_gate is None:
        return (*_align(ids, E, BM), weights)
    M, H = T * k, x.shape[1]
    NBS = triton.cdiv(T, BM)
    rows, block_expert, NB = _align(ids, E, BM, extra_blocks=NBS)
    w_x = torch.empty(M + T, dtype=torch.float32, device=x.device)
    _shared_rows_kernel[(T,)](weights, x, shared_gate, w_x, rows, block_expert, T, H, E, M, NB - NBS, NBS, TOPK=k,
                              KP=pow2(k, 2), BM=BM, BK=min(1024, pow2(H)))
    return rows, block_expert, NB, w_x


def _grouped(x, gate_up_proj, down_proj, weights, ids, shared, block_m: int | None = None):
    """The grouped-GEMM path; with `shared` (as in _gemv) the shared expert joins as expert E:
    its rows (every token, in order, weighted by its sigmoid gate) need no grouping and go in
    blocks after the routed ones."""
    T, H = x.shape
    E, I = gate_up_proj.shape[0], down_proj.shape[-1]
    k = ids.shape[1]
    M = T * k
    BM = block_m or (16 if M <= 16 * E else 64)
    if shared is None:
        sg = su = sd = gate_up_proj  # never read
        IS, SH_E, NS = I, -1, 0
        rows, block_expert, NB, weights = align_blocks(x, weights, ids, E, BM)
    else:
        sg, su, sd, sgw = (w.contiguous() for w in shared)
        IS, SH_E, NS = sg.shape[0], E, 1
        rows, block_expert, NB, weights = align_blocks(x, weights, ids, E, BM, sgw)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 models get fp32 products
    NBK = size_class(NB)
    IH = max(I, IS)
    h = torch.empty(NB * BM, IH, dtype=x.dtype, device=x.device)
    _gate_up_kernel[lambda meta: (NB, triton.cdiv(IH, meta["BN"]))](x, gate_up_proj, rows, block_expert, h, sg, su,
                                                                    M, H, I, IS, IH, SH_E, NBK, TOPK=k, BM=BM,
                                                                    PREC=prec)
    y = torch.empty(M + NS * T, H, dtype=x.dtype, device=x.device)
    _down_kernel[lambda meta: (NB, triton.cdiv(H, meta["BN"]))](h, down_proj, rows, block_expert, weights, y, sd,
                                                                H, I, IS, IH, SH_E, NBK, BM=BM, PREC=prec)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    BH = min(1024, pow2(H))
    if shared is None:
        _sum_k_kernel[(T, triton.cdiv(H, BH))](y, out, T, H, TOPK=k, BH=BH)
    else:
        _sum_shared_kernel[(T, triton.cdiv(H, BH))](y, out, T, H, M, TOPK=k, BH=BH)
    return out


def moe_experts_shared(x, gate_up_proj, down_proj, weights, ids, shared_gate_proj, shared_up_proj,
                       shared_down_proj, shared_expert_gate, *, block_m: int | None = None,
                       gemv: bool | None = None) -> torch.Tensor:
    """The MoE block's output: routed experts plus sigmoid(x shared_expert_gate^T) * shared_expert(x),
    the shared expert as one more assignment per token of the GEMV path (few rows) or as one more
    expert of the grouped GEMM (no separate shared-expert matmuls and elementwise launches).
    shared_gate_proj / shared_up_proj [Is, H], shared_down_proj [H, Is], shared_expert_gate [1, H]."""
    T, H = x.shape
    if T == 0:
        return x.new_zeros(T, H)
    shared = (shared_gate_proj, shared_up_proj, shared_down_proj, shared_expert_gate)
    x, ids = x.contiguous(), ids.contiguous()
    if gemv if gemv is not None else (T * ids.shape[1] <= GEMV_MAX_ROWS and block_m is None):
        return _gemv(x, gate_up_proj, down_proj, weights, ids, shared)
    return _grouped(x, gate_up_proj, down_proj, weights, ids, shared, block_m)


def moe_experts(x, gate_up_proj, down_proj, weights, ids, *, block_m: int | None = None,
                gemv: bool | None = None) -> torch.Tensor:
    """x [T, H]; gate_up_proj [E, 2I, H]; down_proj [E, H, I]; weights/ids [T, k] -> [T, H].
    `block_m` / `gemv` force a path and block size (tests, benchmarks)."""
    T, H = x.shape
    if T == 0:
        return x.new_zeros(T, H)
    x, ids = x.contiguous(), ids.contiguous()
    if gemv if gemv is not None else (T * ids.shape[1] <= GEMV_MAX_ROWS and block_m is None):
        return _gemv(x, gate_up_proj, down_proj, weights, ids, None)
    return _grouped(x, gate_up_proj, down_proj, weights, ids, None, block_m)
