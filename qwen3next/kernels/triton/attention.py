"""Triton attention over the paged KV cache: KV write, varlen prefill with a cached prefix, and
split-KV decode; plus the fused output gate o * sigmoid(gate).

Same signatures as kernels/attention.py (kv_cache [num_blocks, 2, block_size, Hkv, D], query
head h reads KV head h // (Hq // Hkv), causal over cached prefix + new tokens, fp32 softmax).
Prefill: one program per (query head, query tile of one sequence; tile sizes autotuned), online
softmax over the key positions up to the tile's last query. Decode (one new token per sequence, T == B): one
program per (sequence, KV head, split) with the whole GQA group as the matrix rows, partial
results merged by a log-sum-exp combine; no host sync, so it can be graph-captured.
Prefills without a cached prefix (the caller passes the new k / v and host lengths) can skip the
pages: equal lengths through torch SDPA's cuDNN attention, others through `prefill_fresh`, which
reads k / v as TMA tiles (heads fastest in the grid, longest query tiles first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ...env_switches import switch
from ._util import autotune, chunk_of, pow2, size_class

# prefills without a cached prefix (the caller hands the new k / v and the host lengths): equal
# lengths through cuDNN's attention (QWEN3NEXT_ATTN_CUDNN=0: off), others through prefill_fresh's
# TMA kernel (QWEN3NEXT_ATTN_FRESH=0: off); both fall back to the paged kernel
DENSE_CUDNN = switch("QWEN3NEXT_ATTN_CUDNN") == "1"
PREFILL_FRESH = switch("QWEN3NEXT_ATTN_FRESH") == "1"


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kv_ptr, slot_ptr, BS: tl.constexpr, W: tl.constexpr, BW: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        o = tl.arange(0, BW)
        m = o < W
        blk = slot // BS
        off = slot % BS
        base = kv_ptr + (blk * 2 * BS + off) * W
        tl.store(base + o, tl.load(k_ptr + t * W + o, mask=m).to(kv_ptr.dtype.element_ty), mask=m)
        tl.store(base + BS * W + o, tl.load(v_ptr + t * W + o, mask=m).to(kv_ptr.dtype.element_ty), mask=m)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] -> kv_cache at slot_mapping [T] (negative slots are skipped)."""
    T = k.shape[0]
    W = k.shape[1] * k.shape[2]
    if T:
        _write_kv_kernel[(T,)](k.contiguous(), v.contiguous(), kv_cache, slot_mapping.to(torch.int64).contiguous(),
                               BS=kv_cache.shape[2], W=W, BW=pow2(W))


# (query tile BM, key tile BN, warps, stages), timed per head size and size class of T (a verify
# step's few tokens want small query tiles, an 8K prompt large ones); the first is the interpreter's
@autotune([triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st)
           for bm, bn, w, st in ((16, 32, 4, 2), (64, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2), (64, 64, 4, 3),
                                 (64, 32, 4, 3), (64, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2),
                                 (16, 64, 4, 2), (32, 64, 4, 2))], key=["D", "TB"])
@triton.jit(do_not_specialize=["B", "max_blocks", "TB"])
def _prefill_kernel(q_ptr, kv_ptr, bt_ptr, cu_ptr, B, ctx_ptr, o_ptr, scale, max_blocks, TB,
                    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                    BB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    # grid (HQ, tiles): a KV head's query heads run together (its K / V from L2) and the longest
    # tiles start first (H200, 8K tokens: 1.21 ms instead of 1.32 with tiles fastest, in order)
    h = tl.program_id(0)
    i_t = tl.num_programs(1) - 1 - tl.program_id(1)
    hkv = h // (HQ // HKV)
    seq, ci = chunk_of(cu_ptr, B, i_t, BM, BB)
    if seq < 0:
        return
    seq = seq.to(tl.int64)
    bos = tl.load(cu_ptr + seq)
    eos = tl.load(cu_ptr + seq + 1)
    ctx = tl.load(ctx_ptr + seq)
    i = ci * BM + tl.arange(0, BM)                       # query index within the new tokens
    rows = bos + i
    rm = rows < eos
    qpos = ctx + i                                       # absolute position of each query
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (rows[:, None] * HQ + h) * D + d[None, :], mask=rm[:, None], other=0.0)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634                # softmax in base 2 (exp2)
    kv_end = ctx + tl.minimum((ci + 1) * BM, eos - bos)  # keys needed by the tile's last query
    # keys before the tile's first query are visible to all its queries: no masks in that part
    full_end = (ctx + ci * BM) // BN * BN
    for start in range(0, full_end, BN):
        p = start + tl.arange(0, BN)
        page = tl.load(bt_ptr + seq * max_blocks + p // BS).to(tl.int64)
        kaddr = ((page * 2 * BS + p % BS) * HKV + hkv) * D
        k = tl.load(kv_ptr + kaddr[:, None] + d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        pe = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pe, 1)
        v = tl.load(kv_ptr + kaddr[:, None] + BS * HKV * D + d[None, :])
        acc = acc * alpha[:, None] + tl.dot(pe.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    for start in range(full_end, kv_end, BN):
        p = start + tl.arange(0, BN)
        pm = p < kv_end
        page = tl.load(bt_ptr + seq * max_blocks + p // BS, mask=pm, other=0).to(tl.int64)
        kaddr = ((page * 2 * BS + p % BS) * HKV + hkv) * D
        k = tl.load(kv_ptr + kaddr[:, None] + d[None, :], mask=pm[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where((p[None, :] <= qpos[:, None]) & pm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        pe = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pe, 1)
        v = tl.load(kv_ptr + kaddr[:, None] + BS * HKV * D + d[None, :], mask=pm[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(pe.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(o_ptr + (rows[:, None] * HQ + h) * D + d[None, :], o.to(o_ptr.dtype.element_ty), mask=rm[:, None])


def _desc_hook(nargs):
    """Autotune pre-hook: the K / V descriptors' box is one key tile of one KV head."""
    for name in ("k_desc", "v_desc"):
        nargs[name].block_shape = [nargs["BN"], nargs["D"]]


# (BM, BN, warps, stages) of the fresh-prefill kernel, BM % BN == 0 (the diagonal starts on a key
# tile); the first is the interpreter's. H200, 8K tokens: 128/64/8/2 1.09 ms, 64/64/4/3 1.15, 64/32/4/2 1.36
FRESH_CONFIGS = ((16, 16, 4, 2), (64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2))


@triton.jit
def _softmax_step(q, k, v, m_i, l_i, acc, qk_scale, keep, MASKED: tl.constexpr, PREC: tl.constexpr):
    """One key tile of the online softmax (base 2, the scale folded into one multiply-add)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if MASKED:
        s = tl.where(keep, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        pe = tl.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        pe = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(pe, 1)
    acc = tl.dot(pe.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["B", "TB"])
def _prefill_fresh_body(q_ptr, k_desc, v_desc, cu_ptr, B, o_ptr, scale, TB,
                        HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BB: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    # heads fastest, so the HQ // HKV heads reading one KV head run together (K / V from L2);
    # query tiles in reverse, so each sequence's longest tiles start first
    h = tl.program_id(0)
    hkv = h // (HQ // HKV)
    seq, ci = chunk_of(cu_ptr, B, tl.num_programs(1) - 1 - tl.program_id(1), BM, BB)
    if seq < 0:
        return
    bos = tl.load(cu_ptr + seq)
    n = tl.load(cu_ptr + seq + 1) - bos
    i = ci * BM + tl.arange(0, BM)                       # query index within the sequence
    rows = bos + i
    rm = i < n
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (rows[:, None] * HQ + h) * D + d[None, :], mask=rm[:, None], other=0.0)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634
    # keys before the tile's first query: TMA tiles of the contiguous k / v rows, no mask
    for start in range(0, ci * BM, BN):
        k = k_desc.load([(bos + start).to(tl.int32), hkv * D])
        v = v_desc.load([(bos + start).to(tl.int32), hkv * D])
        m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, qk_scale, None, False, PREC)
    # the diagonal: key j <= query i (keys past the sequence end fail it for every stored row)
    for start in range(ci * BM, tl.minimum((ci + 1) * BM, n), BN):
        j = start + tl.arange(0, BN)
        k = k_desc.load([(bos + start).to(tl.int32), hkv * D])
        v = v_desc.load([(bos + start).to(tl.int32), hkv * D])
        m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, qk_scale, j[None, :] <= i[:, None], True, PREC)
    o = acc / l_i[:, None]
    tl.store(o_ptr + (rows[:, None] * HQ + h) * D + d[None, :], o.to(o_ptr.dtype.element_ty), mask=rm[:, None])


_prefill_fresh_kernel = autotune([triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st, pre_hook=_desc_hook)
                                  for bm, bn, w, st in FRESH_CONFIGS], key=["D", "TB"])(_prefill_fresh_body)


@triton.jit(do_not_specialize=["max_blocks", "NSPLIT"])
def _decode_kernel(q_ptr, kv_ptr, bt_ptr, ctx_ptr, po_ptr, pm_ptr, pl_ptr, scale, max_blocks, NSPLIT,
                   HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                   G: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hkv = tl.program_id(1)
    sp = tl.program_id(2)
    g = tl.arange(0, GP)
    gm = g < G
    h = hkv * G + g                                      # the query heads of this KV head
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (b * HQ + h[:, None]) * D + d[None, :], mask=gm[:, None], other=0.0)
    L = tl.load(ctx_ptr + b) + 1                         # cached tokens + the new one
    per = tl.cdiv(tl.cdiv(L, NSPLIT), BN) * BN
    lo = sp * per
    hi = tl.minimum(lo + per, L)
    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for start in range(lo, hi, BN):
        p = start + tl.arange(0, BN)
        pm = p < hi
        page = tl.load(bt_ptr + b * max_blocks + p // BS, mask=pm, other=0).to(tl.int64)
        kaddr = ((page * 2 * BS + p % BS) * HKV + hkv) * D
        k = tl.load(kv_ptr + kaddr[:, None] + d[None, :], mask=pm[:, None], other=0.0)
        s = tl.where(pm[None, :], tl.dot(q, tl.trans(k), input_precision=PREC) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        pe = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pe, 1)
        v = tl.load(kv_ptr + kaddr[:, None] + BS * HKV * D + d[None, :], mask=pm[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(pe.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    # partial results [B, HQ, NSPLIT, (D)]: an empty split leaves m = -inf, l = 0
    base = (b * HQ + h) * NSPLIT + sp
    tl.store(po_ptr + base[:, None] * D + d[None, :], acc, mask=gm[:, None])
    tl.store(pm_ptr + base, m_i, mask=gm)
    tl.store(pl_ptr + base, l_i, mask=gm)


@triton.jit(do_not_specialize=["NSPLIT"])
def _combine_kernel(po_ptr, pm_ptr, pl_ptr, o_ptr, NSPLIT, D: tl.constexpr, SP: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SP)
    sm = s < NSPLIT
    m = tl.load(pm_ptr + bh * NSPLIT + s, mask=sm, other=float("-inf"))
    l = tl.load(pl_ptr + bh * NSPLIT + s, mask=sm, other=0.0)
    mx = tl.max(m, 0)
    w = tl.where(sm & (l > 0), tl.exp(m - mx), 0.0)
    d = tl.arange(0, D)
    po = tl.load(po_ptr + (bh * NSPLIT + s[:, None]) * D + d[None, :], mask=(sm & (l > 0))[:, None], other=0.0)
    o = tl.sum(po * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(o_ptr + bh * D + d, o.to(o_ptr.dtype.element_ty))


def _rows_2d(t: torch.Tensor) -> bool:
    """t [T, H, D] usable as a 2D TMA tensor [T, H * D]: unit inner strides, 16-byte aligned rows."""
    e = t.element_size()
    return (t.stride(2) == 1 and t.stride(1) == t.shape[2] and (t.stride(0) * e) % 16 == 0
            and t.data_ptr() % 16 == 0)


def prefill_fresh(q, k, v, cu_seqlens, scale, config=None):
    """Causal varlen prefill with no cached prefix: q [T, Hq, D], keys / values the new rows k, v
    [T, Hkv, D], read as TMA tiles -> o [T, Hq, D]. config (BM, BN, warps, stages) skips autotuning."""
    T, HQ, D = q.shape
    HKV = k.shape[1]
    B = cu_seqlens.numel() - 1
    o = torch.empty_like(q)
    k_desc = TensorDescriptor(k, [T, HKV * D], [k.stride(0), 1], [16, D])
    v_desc = TensorDescriptor(v, [T, HKV * D], [v.stride(0), 1], [16, D])
    args = (q.contiguous(), k_desc, v_desc, cu_seqlens.to(torch.int64).contiguous(), B, o, scale, size_class(T))
    kw = dict(HQ=HQ, HKV=HKV, D=D, BB=pow2(B, 2), PREC="ieee" if q.dtype == torch.float32 else "tf32")
    if config is None:
        _prefill_fresh_kernel[lambda meta: (HQ, T // meta["BM"] + B)](*args, **kw)
    else:
        bm, bn, w, st = config
        k_desc.block_shape = v_desc.block_shape = [bn, D]
        _prefill_fresh_body[(HQ, T // bm + B)](*args, **kw, BM=bm, BN=bn, num_warps=w, num_stages=st)
    return o


def dense_causal_cudnn(q, k, v, B, scale):
    """B equal-length sequences without cached prefix through torch SDPA's cuDNN backend (GQA):
    q [T, Hq, D], k, v [T, Hkv, D] -> o [T, Hq, D]; None when cuDNN refuses the problem."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    global DENSE_CUDNN
    T, HQ, D = q.shape
    L, HKV = T // B, k.shape[1]
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o = torch.nn.functional.scaled_dot_product_attention(
                q.view(B, L, HQ, D).transpose(1, 2), k.view(B, L, HKV, D).transpose(1, 2),
                v.view(B, L, HKV, D).transpose(1, 2), is_causal=True, scale=scale, enable_gqa=True)
    except RuntimeError:  # no cuDNN attention for this torch / shape: the Triton kernels from now on
        DENSE_CUDNN = False
        return None
    return o.transpose(1, 2).reshape(T, HQ, D)


def _prefill_fresh(q, k, v, cu_seqlens, scale, fresh_lens):
    """The no-prefix prefill paths (host-known lengths), or None for the paged kernel."""
    if (k is None or v is None or not fresh_lens or k.shape[0] != q.shape[0] or q.shape[-1] > 256
            or not k.dtype == v.dtype == q.dtype):
        return None
    if DENSE_CUDNN and q.dtype != torch.float32 and len(set(fresh_lens)) == 1 and q.is_cuda:
        o = dense_causal_cudnn(q, k, v, len(fresh_lens), scale)
        if o is not None:
            return o
    # TMA descriptors: Hopper and later (the interpreter runs them anywhere)
    tma = not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] >= 9
    if PREFILL_FRESH and tma and _rows_2d(k) and _rows_2d(v):
        return prefill_fresh(q, k, v, cu_seqlens, scale)
    return None


def paged_attention(q, kv_cache, block_tables, cu_seqlens, context_lens, scale, *, k=None, v=None,
                    fresh_lens: list[int] | None = None, num_splits: int | None = None):
    """q [T, Hq, D]; new tokens already written; context_lens [B] = cached tokens before this
    step. Causal over cached prefix + new tokens -> o [T, Hq, D]. k, v [T, Hkv, D], the new rows,
    with fresh_lens (host list of new tokens per sequence, given only when no sequence has cached
    tokens) take the no-prefix paths: cuDNN for equal lengths, else the TMA kernel."""
    T, HQ, D = q.shape
    _, _, BS, HKV, _ = kv_cache.shape
    B = cu_seqlens.numel() - 1
    if T == 0:
        return torch.empty_like(q)
    bt = block_tables.to(torch.int64).contiguous()
    ctx = torch.as_tensor(context_lens, device=q.device).to(torch.int64).contiguous()
    if T != B:
        o = _prefill_fresh(q, k, v, cu_seqlens, scale, fresh_lens)
        if o is not None:
            return o
    o = torch.empty_like(q)
    q = q.contiguous()
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 models get fp32 products
    if T == B:  # decode: every sequence brings one token
        G = HQ // HKV
        # enough programs to fill the GPU at batch 1 too (empty splits exit at once)
        nsplit = num_splits or max(1, min(128, triton.cdiv(4 * 132, B * HKV)))
        po = torch.empty(B, HQ, nsplit, D, dtype=torch.float32, device=q.device)
        pm = torch.empty(B, HQ, nsplit, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        _decode_kernel[(B, HKV, nsplit)](q, kv_cache, bt, ctx, po, pm, pl, scale, bt.shape[1], nsplit,
                                         HQ=HQ, HKV=HKV, D=D, BS=BS, G=G, GP=pow2(G),
                                         BN=max(64 if q.is_cuda else 16, BS), PREC=prec, num_warps=4)
        _combine_kernel[(B * HQ,)](po, pm, pl, o, nsplit, D=D, SP=pow2(nsplit, 2))
    else:
        _prefill_kernel[lambda meta: (HQ, T // meta["BM"] + B)](
            q, kv_cache, bt, cu_seqlens.to(torch.int64).contiguous(), B, ctx, o, scale, bt.shape[1], size_class(T),
            HQ=HQ, HKV=HKV, D=D, BS=BS, BB=pow2(B, 2), PREC=prec)
    return o


@triton.jit(do_not_specialize=["N"])
def _gate_kernel(o_ptr, g_ptr, y_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    o = tl.load(o_ptr + i, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + i, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, (o / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["R", "NH", "S0", "S1"])
def _gate_rows_kernel(o_ptr, g_ptr, y_ptr, R, NH, S0, S1, D: tl.constexpr, BR: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)      # [BR] flat (token, head) row
    d = tl.arange(0, D)
    m = (row < R)[:, None]
    go = ((row // NH) * S0 + (row % NH) * S1)[:, None] + d[None, :]
    o = tl.load(o_ptr + row[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + go, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row[:, None] * D + d[None, :], (o / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty), mask=m)


def gate_output(o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """o * sigmoid(gate) elementwise (the gated attention's output gate), in o's dtype. A per-head
    gate view [T, H, D] (the gate half of q_proj's [query | gate]) is read in place."""
    o = o.contiguous()
    y = torch.empty_like(o)
    if gate.dim() == 3 and gate.stride(-1) == 1 and o.shape == gate.shape and pow2(o.shape[-1], 1) == o.shape[-1]:
        T, NH, D = o.shape
        R = T * NH
        if R:
            BR = max(1, min(16, 4096 // D))
            _gate_rows_kernel[(triton.cdiv(R, BR),)](o, gate, y, R, NH, gate.stride(0), gate.stride(1), D=D, BR=BR)
        return y
    gate = gate.contiguous()
    N = o.numel()
    if N:
        _gate_kernel[(triton.cdiv(N, 1024),)](o, gate, y, N, BLOCK=1024)
    return y
