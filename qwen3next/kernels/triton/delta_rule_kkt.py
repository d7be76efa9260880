"""Triton gated delta rule, first stage of the chunked path: per (chunk, v-head) the gates' cumulative
sum, T = (I + beta K K^T * decay)^-1 by 16 x 16 blocks, and from it U = T beta V and
Kd = T (beta 2^G) K (`_kkt_solve_kernel`, T's blocks kept in registers), or T stored for
`_wu_kernel`; optionally the causal decayed Q K^T the fused-output state kernel reads.
Used by delta_rule.gated_delta_rule_chunked (the layouts are documented there).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._util import chunk_of

LOG2E = tl.constexpr(1.4426950408889634)  # g -> log2 units (exp2 below)


@triton.jit
def _inv_unit_lower(a, BC: tl.constexpr):
    """(I + a)^-1 for a strictly lower-triangular [BC, BC] block, by forward substitution."""
    o = tl.arange(0, BC)
    n = -a
    for r in range(2, BC):
        row = tl.sum(tl.where(o[:, None] == r, n, 0.0), 0)            # -a[r, :]
        row = row + tl.sum(row[:, None] * n, 0)                       # - a[r] - a[r] N
        n = tl.where(o[:, None] == r, row[None, :], n)
    return n + tl.where(o[:, None] == o[None, :], 1.0, 0.0)


@triton.jit
def _blk_a(kk, beta_i, G_i, G_j, DIAG: tl.constexpr, BC: tl.constexpr):
    """beta_i (k_i . k_j) 2^(G_i - G_j) (G in log2 units), strictly lower on the diagonal block."""
    d = G_i[:, None] - G_j[None, :]
    if DIAG:
        o = tl.arange(0, BC)
        low = o[:, None] > o[None, :]
        return tl.where(low, kk * beta_i[:, None] * tl.exp2(tl.where(low, d, 0.0)), 0.0)
    return kk * beta_i[:, None] * tl.exp2(d)


@triton.jit
def _blk_qk(qk, G_i, G_j, DIAG: tl.constexpr, BC: tl.constexpr):
    """(q_i . k_j) 2^(G_i - G_j), causal (diagonal included) on the diagonal block."""
    d = G_i[:, None] - G_j[None, :]
    if DIAG:
        o = tl.arange(0, BC)
        inc = o[:, None] >= o[None, :]
        return tl.where(inc, qk * tl.exp2(tl.where(inc, d, 0.0)), 0.0)
    return qk * tl.exp2(d)


@triton.jit
def _apply_t(t00, t10, t11, t20, t21, t22, t30, t31, t32, t33, x_ptr, SX, s0, s1, s2, s3,
             r0, r1, r2, r3, m0, m1, m2, m3, out_ptr, SO, D: tl.constexpr, BD: tl.constexpr,
             PREC: tl.constexpr):
    """out = T (s X) for one chunk: T as its ten [BC, BC] blocks (out's dtype), X [4 x BC, D] rows
    r0..r3 at x_ptr (row stride SX), s [4 x BC] row scales; out rows at out_ptr (row stride SO)."""
    dt = out_ptr.dtype.element_ty
    for cc in range(0, D, BD):
        c = cc + tl.arange(0, BD)[None, :]
        x0 = (tl.load(x_ptr + r0[:, None] * SX + c, mask=m0[:, None], other=0.0) * s0[:, None]).to(dt)
        x1 = (tl.load(x_ptr + r1[:, None] * SX + c, mask=m1[:, None], other=0.0) * s1[:, None]).to(dt)
        x2 = (tl.load(x_ptr + r2[:, None] * SX + c, mask=m2[:, None], other=0.0) * s2[:, None]).to(dt)
        x3 = (tl.load(x_ptr + r3[:, None] * SX + c, mask=m3[:, None], other=0.0) * s3[:, None]).to(dt)
        y = tl.dot(t00, x0, input_precision=PREC)
        tl.store(out_ptr + r0[:, None] * SO + c, y.to(dt), mask=m0[:, None])
        y = tl.dot(t10, x0, input_precision=PREC) + tl.dot(t11, x1, input_precision=PREC)
        tl.store(out_ptr + r1[:, None] * SO + c, y.to(dt), mask=m1[:, None])
        y = tl.dot(t20, x0, input_precision=PREC) + tl.dot(t21, x1, input_precision=PREC)
        y += tl.dot(t22, x2, input_precision=PREC)
        tl.store(out_ptr + r2[:, None] * SO + c, y.to(dt), mask=m2[:, None])
        y = tl.dot(t30, x0, input_precision=PREC) + tl.dot(t31, x1, input_precision=PREC)
        y += tl.dot(t32, x2, input_precision=PREC) + tl.dot(t33, x3, input_precision=PREC)
        tl.store(out_ptr + r3[:, None] * SO + c, y.to(dt), mask=m3[:, None])


@triton.jit(do_not_specialize=["B"])
def _kkt_solve_kernel(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, cu_ptr, B, G_ptr, A_ptr, u_ptr, kd_ptr, qk_ptr, SQ, SK, SV,
                      HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BB: tl.constexpr,
                      BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BQ: tl.constexpr,
                      BA: tl.constexpr, PREC: tl.constexpr, WU: tl.constexpr, QK: tl.constexpr):
    """Per (chunk, v-head): G, T = (I + A)^-1; then either T's rows to A_ptr (WU=False: _wu_kernel
    applies them) or U = T beta V and Kd = T (beta 2^G) K straight from the blocks in registers
    (WU=True: no T round trip); QK=True also stores the causal decayed Q K^T rows (qk_ptr
    [T, Hv, BT]) that the fused state kernel's output needs."""
    i_c = tl.program_id(0)
    h = tl.program_id(1)
    seq, ci = chunk_of(cu_ptr, B, i_c, BT, BB)
    if seq < 0:
        return
    hk = h // (HV // HK)
    bos = tl.load(cu_ptr + seq).to(tl.int64)
    eos = tl.load(cu_ptr + seq + 1).to(tl.int64)
    t0 = bos + ci * BT
    o = tl.arange(0, BC)
    r0 = t0 + o
    r1 = r0 + BC
    r2 = r1 + BC
    r3 = r2 + BC
    m0 = r0 < eos
    m1 = r1 < eos
    m2 = r2 < eos
    m3 = r3 < eos
    # cumulative log2-decay over the chunk, per 16-row sub-block  [BC] each
    g0 = tl.load(g_ptr + r0 * HV + h, mask=m0, other=0.0) * LOG2E
    g1 = tl.load(g_ptr + r1 * HV + h, mask=m1, other=0.0) * LOG2E
    g2 = tl.load(g_ptr + r2 * HV + h, mask=m2, other=0.0) * LOG2E
    g3 = tl.load(g_ptr + r3 * HV + h, mask=m3, other=0.0) * LOG2E
    G0 = tl.cumsum(g0, 0)
    G1 = tl.cumsum(g1, 0) + tl.sum(g0, 0)
    G2 = tl.cumsum(g2, 0) + tl.sum(g0, 0) + tl.sum(g1, 0)
    G3 = tl.cumsum(g3, 0) + tl.sum(g0, 0) + tl.sum(g1, 0) + tl.sum(g2, 0)
    tl.store(G_ptr + r0 * HV + h, G0, mask=m0)
    tl.store(G_ptr + r1 * HV + h, G1, mask=m1)
    tl.store(G_ptr + r2 * HV + h, G2, mask=m2)
    tl.store(G_ptr + r3 * HV + h, G3, mask=m3)
    b0 = tl.load(b_ptr + r0 * HV + h, mask=m0, other=0.0)
    b1 = tl.load(b_ptr + r1 * HV + h, mask=m1, other=0.0)
    b2 = tl.load(b_ptr + r2 * HV + h, mask=m2, other=0.0)
    b3 = tl.load(b_ptr + r3 * HV + h, mask=m3, other=0.0)
    kbase = k_ptr + hk * DK
    dt = k_ptr.dtype.element_ty

    # the ten lower blocks of K K^T  [BC, BC]
    a00 = tl.zeros([BC, BC], dtype=tl.float32)
    a10 = tl.zeros([BC, BC], dtype=tl.float32)
    a11 = tl.zeros([BC, BC], dtype=tl.float32)
    a20 = tl.zeros([BC, BC], dtype=tl.float32)
    a21 = tl.zeros([BC, BC], dtype=tl.float32)
    a22 = tl.zeros([BC, BC], dtype=tl.float32)
    a30 = tl.zeros([BC, BC], dtype=tl.float32)
    a31 = tl.zeros([BC, BC], dtype=tl.float32)
    a32 = tl.zeros([BC, BC], dtype=tl.float32)
    a33 = tl.zeros([BC, BC], dtype=tl.float32)
    for kk in range(0, DK, BK):
        ck = kk + tl.arange(0, BK)
        k0 = tl.load(kbase + r0[:, None] * SK + ck[None, :], mask=m0[:, None], other=0.0)
        k1 = tl.load(kbase + r1[:, None] * SK + ck[None, :], mask=m1[:, None], other=0.0)
        k2 = tl.load(kbase + r2[:, None] * SK + ck[None, :], mask=m2[:, None], other=0.0)
        k3 = tl.load(kbase + r3[:, None] * SK + ck[None, :], mask=m3[:, None], other=0.0)
        a00 += tl.dot(k0, tl.trans(k0), input_precision=PREC)
        a10 += tl.dot(k1, tl.trans(k0), input_precision=PREC)
        a11 += tl.dot(k1, tl.trans(k1), input_precision=PREC)
        a20 += tl.dot(k2, tl.trans(k0), input_precision=PREC)
        a21 += tl.dot(k2, tl.trans(k1), input_precision=PREC)
        a22 += tl.dot(k2, tl.trans(k2), input_precision=PREC)
        a30 += tl.dot(k3, tl.trans(k0), input_precision=PREC)
        a31 += tl.dot(k3, tl.trans(k1), input_precision=PREC)
        a32 += tl.dot(k3, tl.trans(k2), input_precision=PREC)
        a33 += tl.dot(k3, tl.trans(k3), input_precision=PREC)
    a00 = _blk_a(a00, b0, G0, G0, True, BC)
    a11 = _blk_a(a11, b1, G1, G1, True, BC)
    a22 = _blk_a(a22, b2, G2, G2, True, BC)
    a33 = _blk_a(a33, b3, G3, G3, True, BC)
    a10 = _blk_a(a10, b1, G1, G0, False, BC)
    a20 = _blk_a(a20, b2, G2, G0, False, BC)
    a21 = _blk_a(a21, b2, G2, G1, False, BC)
    a30 = _blk_a(a30, b3, G3, G0, False, BC)
    a31 = _blk_a(a31, b3, G3, G1, False, BC)
    a32 = _blk_a(a32, b3, G3, G2, False, BC)

    # T = (I + A)^-1 by blocks: T_ii = (I + A_ii)^-1, T_ij = -T_ii sum_{j<=m<i} A_im T_mj
    t00 = _inv_unit_lower(a00, BC)
    t11 = _inv_unit_lower(a11, BC)
    t22 = _inv_unit_lower(a22, BC)
    t33 = _inv_unit_lower(a33, BC)
    t10 = -tl.dot(t11, tl.dot(a10, t00, input_precision=PREC), input_precision=PREC)
    t21 = -tl.dot(t22, tl.dot(a21, t11, input_precision=PREC), input_precision=PREC)
    t32 = -tl.dot(t33, tl.dot(a32, t22, input_precision=PREC), input_precision=PREC)
    t20 = -tl.dot(t22, tl.dot(a20, t00, input_precision=PREC) + tl.dot(a21, t10, input_precision=PREC),
                  input_precision=PREC)
    t31 = -tl.dot(t33, tl.dot(a31, t11, input_precision=PREC) + tl.dot(a32, t21, input_precision=PREC),
                  input_precision=PREC)
    t30 = -tl.dot(t33, tl.dot(a30, t00, input_precision=PREC) + tl.dot(a31, t10, input_precision=PREC)
                  + tl.dot(a32, t20, input_precision=PREC), input_precision=PREC)
    if WU:
        # U = T (beta V) and Kd = T (beta 2^G) K, T's blocks in the operand dtype (as stored before)
        t00, t10, t11, t20 = t00.to(dt), t10.to(dt), t11.to(dt), t20.to(dt)
        t21, t22, t30, t31, t32, t33 = t21.to(dt), t22.to(dt), t30.to(dt), t31.to(dt), t32.to(dt), t33.to(dt)
        _apply_t(t00, t10, t11, t20, t21, t22, t30, t31, t32, t33, v_ptr + h * DV, SV, b0, b1, b2, b3,
                 r0, r1, r2, r3, m0, m1, m2, m3, u_ptr + h * DV, HV * DV, DV, BA, PREC)
        _apply_t(t00, t10, t11, t20, t21, t22, t30, t31, t32, t33, kbase, SK,
                 b0 * tl.exp2(G0), b1 * tl.exp2(G1), b2 * tl.exp2(G2), b3 * tl.exp2(G3),
                 r0, r1, r2, r3, m0, m1, m2, m3, kd_ptr + h * DK, HV * DK, DK, BA, PREC)
    else:
        # rows of T as [T, Hv, 64]; blocks above the diagonal are never stored (readers mask them)
        at = A_ptr.dtype.element_ty
        ap = A_ptr + h * BT + o[None, :]
        tl.store(ap + r0[:, None] * (HV * BT), t00.to(at), mask=m0[:, None])
        tl.store(ap + r1[:, None] * (HV * BT), t10.to(at), mask=m1[:, None])
        tl.store(ap + r1[:, None] * (HV * BT) + BC, t11.to(at), mask=m1[:, None])
        tl.store(ap + r2[:, None] * (HV * BT), t20.to(at), mask=m2[:, None])
        tl.store(ap + r2[:, None] * (HV * BT) + BC, t21.to(at), mask=m2[:, None])
        tl.store(ap + r2[:, None] * (HV * BT) + 2 * BC, t22.to(at), mask=m2[:, None])
        tl.store(ap + r3[:, None] * (HV * BT), t30.to(at), mask=m3[:, None])
        tl.store(ap + r3[:, None] * (HV * BT) + BC, t31.to(at), mask=m3[:, None])
        tl.store(ap + r3[:, None] * (HV * BT) + 2 * BC, t32.to(at), mask=m3[:, None])
        tl.store(ap + r3[:, None] * (HV * BT) + 3 * BC, t33.to(at), mask=m3[:, None])
    if QK:
        # the ten lower blocks of Q K^T (diagonal included), decayed, stored as [T, Hv, BT] rows
        c00 = tl.zeros([BC, BC], dtype=tl.float32)
        c10 = tl.zeros([BC, BC], dtype=tl.float32)
        c11 = tl.zeros([BC, BC], dtype=tl.float32)
        c20 = tl.zeros([BC, BC], dtype=tl.float32)
        c21 = tl.zeros([BC, BC], dtype=tl.float32)
        c22 = tl.zeros([BC, BC], dtype=tl.float32)
        c30 = tl.zeros([BC, BC], dtype=tl.float32)
        c31 = tl.zeros([BC, BC], dtype=tl.float32)
        c32 = tl.zeros([BC, BC], dtype=tl.float32)
        c33 = tl.zeros([BC, BC], dtype=tl.float32)
        qbase = q_ptr + hk * DK
        # narrower pieces (BQ): eight operand tiles live here (registers: one warp)
        for kk in range(0, DK, BQ):
            ck = kk + tl.arange(0, BQ)
            k0 = tl.load(kbase + r0[:, None] * SK + ck[None, :], mask=m0[:, None], other=0.0)
            k1 = tl.load(kbase + r1[:, None] * SK + ck[None, :], mask=m1[:, None], other=0.0)
            k2 = tl.load(kbase + r2[:, None] * SK + ck[None, :], mask=m2[:, None], other=0.0)
            k3 = tl.load(kbase + r3[:, None] * SK + ck[None, :], mask=m3[:, None], other=0.0)
            q0 = tl.load(qbase + r0[:, None] * SQ + ck[None, :], mask=m0[:, None], other=0.0)
            q1 = tl.load(qbase + r1[:, None] * SQ + ck[None, :], mask=m1[:, None], other=0.0)
            q2 = tl.load(qbase + r2[:, None] * SQ + ck[None, :], mask=m2[:, None], other=0.0)
            q3 = tl.load(qbase + r3[:, None] * SQ + ck[None, :], mask=m3[:, None], other=0.0)
            c00 += tl.dot(q0, tl.trans(k0), input_precision=PREC)
            c10 += tl.dot(q1, tl.trans(k0), input_precision=PREC)
            c11 += tl.dot(q1, tl.trans(k1), input_precision=PREC)
            c20 += tl.dot(q2, tl.trans(k0), input_precision=PREC)
            c21 += tl.dot(q2, tl.trans(k1), input_precision=PREC)
            c22 += tl.dot(q2, tl.trans(k2), input_precision=PREC)
            c30 += tl.dot(q3, tl.trans(k0), input_precision=PREC)
            c31 += tl.dot(q3, tl.trans(k1), input_precision=PREC)
            c32 += tl.dot(q3, tl.trans(k2), input_precision=PREC)
            c33 += tl.dot(q3, tl.trans(k3), input_precision=PREC)
        cp = qk_ptr + h * BT + o[None, :]
        qt = qk_ptr.dtype.element_ty
        tl.store(cp + r0[:, None] * (HV * BT), _blk_qk(c00, G0, G0, True, BC).to(qt), mask=m0[:, None])
        tl.store(cp + r1[:, None] * (HV * BT), _blk_qk(c10, G1, G0, False, BC).to(qt), mask=m1[:, None])
        tl.store(cp + r1[:, None] * (HV * BT) + BC, _blk_qk(c11, G1, G1, True, BC).to(qt), mask=m1[:, None])
        tl.store(cp + r2[:, None] * (HV * BT), _blk_qk(c20, G2, G0, False, BC).to(qt), mask=m2[:, None])
        tl.store(cp + r2[:, None] * (HV * BT) + BC, _blk_qk(c21, G2, G1, False, BC).to(qt), mask=m2[:, None])
        tl.store(cp + r2[:, None] * (HV * BT) + 2 * BC, _blk_qk(c22, G2, G2, True, BC).to(qt), mask=m2[:, None])
        tl.store(cp + r3[:, None] * (HV * BT), _blk_qk(c30, G3, G0, False, BC).to(qt), mask=m3[:, None])
        tl.store(cp + r3[:, None] * (HV * BT) + BC, _blk_qk(c31, G3, G1, False, BC).to(qt), mask=m3[:, None])
        tl.store(cp + r3[:, None] * (HV * BT) + 2 * BC, _blk_qk(c32, G3, G2, False, BC).to(qt), mask=m3[:, None])
        tl.store(cp + r3[:, None] * (HV * BT) + 3 * BC, _blk_qk(c33, G3, G3, True, BC).to(qt), mask=m3[:, None])


@triton.jit(do_not_specialize=["B"])
def _wu_kernel(k_ptr, v_ptr, b_ptr, G_ptr, A_ptr, cu_ptr, B, u_ptr, kd_ptr, SK, SV,
               HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BB: tl.constexpr,
               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    i_c = tl.program_id(0)
    h = tl.program_id(1)
    seq, ci = chunk_of(cu_ptr, B, i_c, BT, BB)
    if seq < 0:
        return
    hk = h // (HV // HK)
    bos = tl.load(cu_ptr + seq).to(tl.int64)
    eos = tl.load(cu_ptr + seq + 1).to(tl.int64)
    o = tl.arange(0, BT)
    rows = bos + ci * BT + o
    rm = rows < eos
    low = (o[None, :] <= o[:, None]) & rm[:, None]
    Tm = tl.load(A_ptr + (rows[:, None] * HV + h) * BT + o[None, :], mask=low, other=0.0)     # [BT, BT]
    beta = tl.load(b_ptr + rows * HV + h, mask=rm, other=0.0)
    G = tl.load(G_ptr + rows * HV + h, mask=rm, other=0.0)
    dt = u_ptr.dtype.element_ty
    for vv in range(0, DV, BV):
        cv = vv + tl.arange(0, BV)
        v = tl.load(v_ptr + rows[:, None] * SV + h * DV + cv[None, :], mask=rm[:, None], other=0.0)
        u = tl.dot(Tm, (v * beta[:, None]).to(dt), input_precision=PREC)
        tl.store(u_ptr + (rows[:, None] * HV + h) * DV + cv[None, :], u.to(dt), mask=rm[:, None])
    sk = beta * tl.exp2(G)
    for kk in range(0, DK, BK):
        ck = kk + tl.arange(0, BK)
        k = tl.load(k_ptr + rows[:, None] * SK + hk * DK + ck[None, :], mask=rm[:, None], other=0.0)
        kd = tl.dot(Tm, (k * sk[:, None]).to(dt), input_precision=PREC)
        tl.store(kd_ptr + (rows[:, None] * HV + h) * DK + ck[None, :], kd.to(dt), mask=rm[:, None])
