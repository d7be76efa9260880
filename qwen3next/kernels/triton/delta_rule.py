"""Triton gated delta rule: chunked prefill over a packed varlen batch, and the recurrent form.

Same signatures as kernels/delta_rule.py (spec §5.5-5.6). The chunked path (1-2 in delta_rule_kkt.py):
  1. `_kkt_solve_kernel` per (chunk, v-head): G = cumsum(g) (stored in log2 units: every decay
                     below is one exp2), A = beta K K^T * decay in 16x16 blocks, T = (I + A)^-1
                     (forward substitution on the diagonal blocks, then a block merge), then by
                     default U = T beta V, Kd = T (beta e^G) K from T's blocks in registers;
                     or (fuse_wu=False) T stored as [T, Hv, 64] rows for
  2. `_wu_kernel`    per (chunk, v-head): U, Kd with whole 64x64 tiles.
  3. `_state_kernel` per (sequence, v-head, dv block), sequential over chunks: reads the initial
                     state from the pool slot, keeps S in registers, forms W = U - Kd S_0, decays
                     W's rows (not K's) for the update, writes the final S back to the slot. Either
                     it also emits the output (fuse_output=True: O = e^G Q S_0 + (causal
                     decay-masked Q K^T, stored by the kkt kernel) W in the loop), or it stores
                     each chunk's S_0 and W and
  4. `_out_kernel`   computes O per (chunk, v-head, dv block) in parallel; given the layer's gate
                     (`norm=(z, weight, eps)`, whole-head tiles) it stores the gated RMSNorm of O's
                     rows instead (norm.gated_rows on O rounded to the output dtype: the same bits as
                     norm.gated_rmsnorm on the stored O, without O's write and read-back).
Chunk tables are built on the device (no host sync). Matrix products take the activation dtype
(bf16 on GPU) with fp32 accumulation; the state is fp32 in the kernels, its pool fp32 or bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import chunk_of, chunk_start, pow2
from .delta_rule_kkt import _kkt_solve_kernel, _wu_kernel
from .norm import _row_view, gated_rmsnorm, gated_rows

BT = 64  # chunk length (the spec's 64)
BC = 16  # sub-block of the (I + A) inverse


@triton.jit(do_not_specialize=["B"])
def _state_kernel(q_ptr, k_ptr, u_ptr, kd_ptr, G_ptr, qk_ptr, w_ptr, h_ptr, o_ptr, cu_ptr, B,
                  st_ptr, slot_ptr, init_ptr, SQ, SK,
                  HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BB: tl.constexpr,
                  BT: tl.constexpr, BV: tl.constexpr, HAS_STATE: tl.constexpr, FUSE_O: tl.constexpr,
                  PREC: tl.constexpr):
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HV
    h = bh % HV
    hk = h // (HV // HK)
    bos = tl.load(cu_ptr + b).to(tl.int64)
    eos = tl.load(cu_ptr + b + 1).to(tl.int64)
    c0 = chunk_start(cu_ptr, B, b, BT, BB).to(tl.int64)
    ck = tl.arange(0, DK)
    cv = iv * BV + tl.arange(0, BV)
    o_i = tl.arange(0, BT)
    causal = o_i[:, None] >= o_i[None, :]
    S = tl.zeros([DK, BV], dtype=tl.float32)                         # state block S[:, cv]
    if HAS_STATE:
        slot = tl.load(slot_ptr + b).to(tl.int64)
        init = tl.load(init_ptr + b)
        sp = st_ptr + ((slot * HV + h) * DK + ck[:, None]) * DV + cv[None, :]
        if (slot >= 0) & (init != 0):
            S = tl.load(sp).to(tl.float32)
    dt = k_ptr.dtype.element_ty
    n_chunks = tl.cdiv(eos - bos, BT)
    for ci in range(n_chunks):
        t0 = bos + ci * BT
        rows = t0 + o_i
        rm = rows < eos
        kd = tl.load(kd_ptr + (rows[:, None] * HV + h) * DK + ck[None, :], mask=rm[:, None], other=0.0)
        u = tl.load(u_ptr + (rows[:, None] * HV + h) * DV + cv[None, :], mask=rm[:, None], other=0.0)
        k = tl.load(k_ptr + rows[:, None] * SK + hk * DK + ck[None, :], mask=rm[:, None], other=0.0)
        G = tl.load(G_ptr + rows * HV + h, mask=rm, other=0.0)                    # log2 units
        G_last = tl.load(G_ptr + (tl.minimum(t0 + BT, eos) - 1) * HV + h)
        Sd = S.to(dt)
        w = u.to(tl.float32) - tl.dot(kd, Sd, input_precision=PREC)            # [BT, BV]
        if FUSE_O:
            # O = 2^G Q S_0 + (causal decayed Q K^T, from the kkt kernel) W: off S's dependency chain
            q = tl.load(q_ptr + rows[:, None] * SQ + hk * DK + ck[None, :], mask=rm[:, None], other=0.0)
            s = tl.load(qk_ptr + (rows[:, None] * HV + h) * BT + o_i[None, :], mask=causal & rm[:, None], other=0.0)
            o = tl.dot(q, Sd, input_precision=PREC) * tl.exp2(G)[:, None]
            o += tl.dot(s, w.to(dt), input_precision=PREC)
            tl.store(o_ptr + (rows[:, None] * HV + h) * DV + cv[None, :], o.to(o_ptr.dtype.element_ty),
                     mask=rm[:, None])
        else:
            # this chunk's incoming state and W, for the output kernel
            tl.store(h_ptr + (((c0 + ci) * HV + h) * DK + ck[:, None]) * DV + cv[None, :], Sd)
            tl.store(w_ptr + (rows[:, None] * HV + h) * DV + cv[None, :], w.to(dt), mask=rm[:, None])
        # S <- 2^G_last S + K^T (2^(G_last - G) W): the decay on W's BV-wide rows, not on K's (the
        # dot then reads K as loaded; measured 746 -> 611 us at T = 32K on the H200)
        wg = (w * tl.exp2(G_last - G)[:, None]).to(dt)
        S = S * tl.exp2(G_last) + tl.dot(tl.trans(k), wg, input_precision=PREC)
    if HAS_STATE:
        if slot >= 0:
            tl.store(sp, S.to(st_ptr.dtype.element_ty))  # fp32 or bf16 pool


@triton.jit(do_not_specialize=["B", "ZNH"])  # (z's strides specialised: 16-byte loads need their divisibility)
def _out_kernel(q_ptr, k_ptr, w_ptr, h_ptr, G_ptr, o_ptr, cu_ptr, B, SQ, SK, z_ptr, nw_ptr, ZT, ZNH, ZS0, ZS1, eps,
                HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BB: tl.constexpr,
                BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, NORM: tl.constexpr):
    i_c = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    seq, ci = chunk_of(cu_ptr, B, i_c, BT, BB)
    if seq < 0:
        return
    hk = h // (HV // HK)
    bos = tl.load(cu_ptr + seq).to(tl.int64)
    eos = tl.load(cu_ptr + seq + 1).to(tl.int64)
    rows = bos + ci * BT + tl.arange(0, BT)
    rm = rows < eos
    cv = iv * BV + tl.arange(0, BV)
    dt = q_ptr.dtype.element_ty
    G = tl.load(G_ptr + rows * HV + h, mask=rm, other=0.0)
    # Q K^T and Q S_0 over BK-wide key pieces (BK < DK: a loop the compiler pipelines, streaming
    # the pieces through shared memory instead of holding whole tiles in registers)
    s = tl.zeros([BT, BT], dtype=tl.float32)
    o = tl.zeros([BT, BV], dtype=tl.float32)
    for kk in range(0, DK, BK):
        ck = kk + tl.arange(0, BK)
        q = tl.load(q_ptr + rows[:, None] * SQ + hk * DK + ck[None, :], mask=rm[:, None], other=0.0)
        k = tl.load(k_ptr + rows[:, None] * SK + hk * DK + ck[None, :], mask=rm[:, None], other=0.0)
        # chunk i_c's incoming state (flat chunk index = the sequence's first chunk + ci)
        hs = tl.load(h_ptr + ((i_c.to(tl.int64) * HV + h) * DK + ck[:, None]) * DV + cv[None, :])
        s += tl.dot(q, tl.trans(k), input_precision=PREC)
        o += tl.dot(q, hs.to(dt), input_precision=PREC)
    w = tl.load(w_ptr + (rows[:, None] * HV + h) * DV + cv[None, :], mask=rm[:, None], other=0.0)
    o_i = tl.arange(0, BT)
    causal = o_i[:, None] >= o_i[None, :]
    s = tl.where(causal, s * tl.exp2(tl.where(causal, G[:, None] - G[None, :], 0.0)), 0.0)
    o = o * tl.exp2(G)[:, None] + tl.dot(s.to(dt), w, input_precision=PREC)
    if NORM:
        # the gated RMSNorm of whole-head rows (BV = DV); z's row (t, h) at t * ZT + (h // ZNH) * ZS0 +
        # (h % ZNH) * ZS1 (one scalar division, not a 64-bit one per row). O rounded first, as stored.
        zh = (h // ZNH) * ZS0 + (h % ZNH) * ZS1
        z = tl.load(z_ptr + (rows * ZT + zh)[:, None] + cv[None, :], mask=rm[:, None], other=0.0)
        o = gated_rows(o.to(o_ptr.dtype.element_ty), z, nw_ptr, cv, DV, eps)
    tl.store(o_ptr + (rows[:, None] * HV + h) * DV + cv[None, :], o.to(o_ptr.dtype.element_ty), mask=rm[:, None])


def _check(q, k, v, g, beta, state, state_slots):
    if q.shape != k.shape or q.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q/k must be [T, Hk, dk] and v [T, Hv, dv]; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if v.shape[1] % q.shape[1]:
        raise ValueError(f"v heads ({v.shape[1]}) must be a multiple of key heads ({q.shape[1]})")
    if g.shape != v.shape[:2] or beta.shape != v.shape[:2]:
        raise ValueError("g and beta must be [T, Hv]")
    if state is not None and state_slots is None:
        raise ValueError("state_slots is required when state is given")


def _rows(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """x [T, heads, d] in `dt` with packed heads (strides (any, d, 1)): the kernels read rows at
    x.stride(0), so a head view of a wider row (the conv output's q / k / v columns) is not copied."""
    if x.dtype != dt:
        return x.to(dt).contiguous()
    if x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
        return x.contiguous()
    return x


def _state_args(state, state_slots, has_initial_state, cu):
    """Kernel arguments for the optional pool (unused pointers get any tensor)."""
    if state is None:
        return cu, cu, cu
    if has_initial_state is None:
        has_initial_state = torch.ones(cu.numel() - 1, dtype=torch.bool, device=cu.device)
    return state, state_slots.contiguous(), has_initial_state.contiguous()


def gated_delta_rule_chunked(q, k, v, g, beta, cu_seqlens, state=None, state_slots=None,
                             has_initial_state=None, *, fuse_output: bool = False, fuse_wu: bool = True,
                             bv_state: int = 32, bv_out: int = 128, warps_state: int = 4,
                             stages_state: int | None = None, warps_kkt: int = 1, ba_kkt: int = 32,
                             bk_out: int = 64, warps_out: int = 4, norm=None):
    """Chunked gated delta rule over a packed varlen batch -> o [T, Hv, dv] in v's dtype.

    q, k [T, Hk, dk] (L2-normalised, q scaled); v [T, Hv, dv] (each may be a row-strided view,
    e.g. columns of the conv output: read in place); g, beta [T, Hv] fp32; state [N, Hv, dk, dv]
    fp32 or bf16 pool (computed in fp32, rounded on store) read at `state_slots` (if
    `has_initial_state`) and written in place with each sequence's final state. The keywords pick
    kernel variants (benchmarks): fuse_wu computes U / Kd in the kkt kernel (else _wu_kernel reads
    T back); fuse_output (implies fuse_wu) also stores Q K^T there and forms the output in the
    state kernel (no _out_kernel); bk_out: the output kernel's key piece. Defaults: the fastest on
    the H200 at 80B shapes (session 5, T = 32K: 1607 us vs 1766 for fuse_wu=False, bk_out=128;
    fuse_output 1874).
    norm (z, weight, eps): return the layer's gated RMSNorm of o instead (rows of dv, z [T, Hv, dv]
    or the layer's [T * Hk, r, dv] view of its projection, unit last stride: read in place), fused
    into the output kernel (widened to whole heads); the same bits as norm.gated_rmsnorm(o, z, ...).
    """
    _check(q, k, v, g, beta, state, state_slots)
    T, HK, DK = q.shape
    HV, DV = v.shape[1], v.shape[2]
    dev = q.device
    B = cu_seqlens.numel() - 1
    if T == 0 or B == 0:
        return torch.empty_like(v)
    # all matrix products share one operand dtype: the activation dtype (fp32 in tests)
    dt = v.dtype if v.dtype != torch.float32 else q.dtype
    q, k, v = _rows(q, dt), _rows(k, dt), _rows(v, dt)
    o = torch.empty(T, HV, DV, dtype=dt, device=dev)
    zs, ZT, ZNH, ZS0, ZS1 = _gate_rows(norm, T, HV, DV) if norm is not None else (o, 0, 1, 0, 0)
    g, beta = g.contiguous().float(), beta.contiguous().float()
    cu = cu_seqlens.to(torch.int64).contiguous()
    NC, BB = T // BT + B, pow2(B, 2)  # flat chunk bound; block holding all sequences
    prec = "ieee" if dt == torch.float32 else "tf32"
    fuse_wu = fuse_wu or fuse_output
    if fuse_output and bv_state < min(32, DV):
        # (H200, triton 3.6: 16-wide fused-output tiles gave wrong outputs and an illegal address)
        raise ValueError(f"bv_state must be >= 32 with fuse_output, got {bv_state}")
    G = torch.empty(T, HV, dtype=torch.float32, device=dev)
    u = torch.empty(T, HV, DV, dtype=dt, device=dev)
    kd = torch.empty(T, HV, DK, dtype=dt, device=dev)
    A = G if fuse_wu else torch.empty(T, HV, BT, dtype=dt, device=dev)
    qk = torch.empty(T, HV, BT, dtype=dt, device=dev) if fuse_output else G
    # (warps: the H200's autotune picks at 80B shapes, session 2)
    _kkt_solve_kernel[(NC, HV)](q, k, v, g, beta, cu, B, G, A, u, kd, qk, q.stride(0), k.stride(0), v.stride(0),
                                HK=HK, HV=HV, DK=DK, DV=DV, BB=BB, BT=BT, BC=BC, BK=min(64, DK), BQ=min(32, DK),
                                BA=min(ba_kkt, DK, DV), PREC=prec, WU=fuse_wu, QK=fuse_output, num_warps=warps_kkt)
    if not fuse_wu:
        _wu_kernel[(NC, HV)](k, v, beta, G, A, cu, B, u, kd, k.stride(0), v.stride(0), HK=HK, HV=HV, DK=DK, DV=DV,
                             BB=BB, BT=BT, BK=min(64, DK), BV=min(64, DV), PREC=prec, num_warps=4)
    st, slots, init = _state_args(state, state_slots, has_initial_state, cu)
    bvs = min(bv_state, DV)
    w = u if fuse_output else torch.empty_like(u)
    hbuf = u if fuse_output else torch.empty(NC, HV, DK, DV, dtype=dt, device=dev)
    extra = {} if stages_state is None else {"num_stages": stages_state}
    _state_kernel[(triton.cdiv(DV, bvs), B * HV)](q, k, u, kd, G, qk, w, hbuf, o, cu, B, st, slots, init,
                                                  q.stride(0), k.stride(0),
                                                  HK=HK, HV=HV, DK=DK, DV=DV, BB=BB, BT=BT, BV=bvs,
                                                  HAS_STATE=state is not None, FUSE_O=fuse_output,
                                                  PREC=prec, num_warps=warps_state, **extra)
    if not fuse_output:
        bvo = DV if norm is not None else min(bv_out, DV)  # the norm needs whole heads
        nw, eps = (norm[1], float(norm[2])) if norm is not None else (o, 0.0)
        _out_kernel[(NC, HV, triton.cdiv(DV, bvo))](q, k, w, hbuf, G, o, cu, B, q.stride(0), k.stride(0),
                                                    zs, nw, ZT, ZNH, ZS0, ZS1, eps, HK=HK, HV=HV,
                                                    DK=DK, DV=DV, BB=BB, BT=BT, BV=bvo, BK=min(bk_out, DK), PREC=prec,
                                                    NORM=norm is not None, num_warps=warps_out)
    elif norm is not None:  # (the state kernel's output tiles are narrower than a head: the norm after)
        return gated_rmsnorm(o.view(norm[0].shape), norm[0], norm[1], norm[2]).view(T, HV, DV)
    return o


def _gate_rows(norm, T: int, HV: int, DV: int):
    """The gate z of `norm` -> (z or a copy, ZT, NH, S0, S1): row (t, h) of its T * HV rows of DV at
    t * ZT + (h // NH) * S0 + (h % NH) * S1 (norm._row_view's rows, NH dividing HV)."""
    z = norm[0]
    if z.numel() != T * HV * DV or z.shape[-1] != DV:
        raise ValueError(f"norm: z shape {tuple(z.shape)} does not hold [{T}, {HV}, {DV}] rows")
    z, NH, S0, S1 = _row_view(z)
    if HV % NH:
        z, NH, S0, S1 = z.contiguous(), 1, DV, 0
    return z, HV // NH * S0, NH, S0, S1


@triton.jit
def _recurrent_kernel(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, o_ptr, cu_ptr, st_ptr, slot_ptr, init_ptr, pts_ptr,
                      HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      BV: tl.constexpr, HAS_STATE: tl.constexpr, PER_TOKEN: tl.constexpr):
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HV
    h = bh % HV
    hk = h // (HV // HK)
    bos = tl.load(cu_ptr + b).to(tl.int64)
    eos = tl.load(cu_ptr + b + 1).to(tl.int64)
    ck = tl.arange(0, DK)
    cv = iv * BV + tl.arange(0, BV)
    S = tl.zeros([DK, BV], dtype=tl.float32)
    if HAS_STATE:
        slot = tl.load(slot_ptr + b).to(tl.int64)
        init = tl.load(init_ptr + b)
        sp = st_ptr + ((slot * HV + h) * DK + ck[:, None]) * DV + cv[None, :]
        if (slot >= 0) & (init != 0):
            S = tl.load(sp).to(tl.float32)
    for t in range(bos, eos):
        qv = tl.load(q_ptr + (t * HK + hk) * DK + ck).to(tl.float32)
        kv = tl.load(k_ptr + (t * HK + hk) * DK + ck).to(tl.float32)
        vv = tl.load(v_ptr + (t * HV + h) * DV + cv).to(tl.float32)
        gt = tl.load(g_ptr + t * HV + h)
        bt = tl.load(b_ptr + t * HV + h)
        S = S * tl.exp(gt)
        vhat = tl.sum(S * kv[:, None], 0)
        S = S + kv[:, None] * (bt * (vv - vhat))[None, :]
        tl.store(o_ptr + (t * HV + h) * DV + cv, tl.sum(S * qv[:, None], 0).to(o_ptr.dtype.element_ty))
        if PER_TOKEN:
            ps = tl.load(pts_ptr + t)
            if ps >= 0:
                tl.store(st_ptr + ((ps * HV + h) * DK + ck[:, None]) * DV + cv[None, :],
                         S.to(st_ptr.dtype.element_ty))
    if HAS_STATE:
        if slot >= 0:
            tl.store(sp, S.to(st_ptr.dtype.element_ty))  # fp32 or bf16 pool


def gated_delta_rule_recurrent(q, k, v, g, beta, cu_seqlens, state=None, state_slots=None,
                               has_initial_state=None, per_token_state_slots=None, *, bv: int = 32):
    """Token-by-token gated delta rule (spec §5.5), same arguments and result as the chunked form.

    per_token_state_slots [T] long (optional, -1 = skip): also store the state after each token
    in that slot of `state` (speculative-decoding rollback).
    """
    _check(q, k, v, g, beta, state, state_slots)
    T, HK, DK = q.shape
    HV, DV = v.shape[1], v.shape[2]
    o = torch.empty_like(v)
    B = cu_seqlens.numel() - 1
    if T == 0 or B == 0:
        return o
    cu = cu_seqlens.to(torch.int64).contiguous()
    st, slots, init = _state_args(state, state_slots, has_initial_state, cu)
    bv = min(bv, DV)
    _recurrent_kernel[(triton.cdiv(DV, bv), B * HV)](
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous().float(), beta.contiguous().float(), o,
        cu, st, slots, init,
        per_token_state_slots.contiguous() if per_token_state_slots is not None else slots,
        HK=HK, HV=HV, DK=DK, DV=DV, BV=bv, HAS_STATE=state is not None,
        PER_TOKEN=per_token_state_slots is not None, num_warps=4)
    return o
