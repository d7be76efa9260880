"""The DeltaNet core of a speculative verify step (a few tokens per sequence, the state after every
token kept in a scratch slot), fused: kernels/gdn.py's `gdn_cached` with per_token_state_slots in
two launches instead of ~20 (windows, conv, state shift, searchsorted, casts, l2norm, gates,
recurrence).

1. `_verify_conv_kernel` per (sequence, channel block): conv + SiLU of every token of the run
   from the cached window and the run's inputs, the window after each token into its scratch slot
   and the final window into the sequence's slot (one program owns those channels of the
   sequence, so it reads the old window before it overwrites it: no race, one launch).
2. `_verify_rec_kernel` per (sequence, v-head, dv block), like the decode step kernel
   (gdn_decode.py) but looping over the run's tokens with the state in registers: q / k L2 norm,
   g and beta from a / b, the delta-rule update, o, and a state store after every token whose
   scratch slot is >= 0, the final state into the sequence's slot. The state is fp32 in
   registers whatever the pool's dtype (fp32, bf16 or fp16), rounded to it on every store.
Negative slots (graph padding) are neither read nor written; such rows still get finite outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import pow2
from .conv1d import _inputs, _x_cols


@triton.jit
def _window(x_ptr, st_ptr, c, xc, cm, i, t, bos, slot, old_ok, C, SX, K1: tl.constexpr, N: tl.constexpr):
    """[BC, KP] fp32: column i < N holds the pre-conv input of channels c at position t - (N-1) + i,
    from x (columns xc) when it lies in the run, else from the sequence's cached window (K1
    columns, oldest first)."""
    src = t - (N - 1) + i                                             # [KP] flat token
    inside = (i < N) & (src >= bos)
    xv = tl.load(x_ptr + src[None, :] * SX + xc[:, None], mask=cm[:, None] & inside[None, :], other=0.0)
    old = (i < N) & (src < bos) & old_ok
    ov = tl.load(st_ptr + (slot[None, :] * C + c[:, None]) * K1 + (K1 + src - bos)[None, :],
                 mask=cm[:, None] & old[None, :], other=0.0)
    return xv.to(tl.float32) + ov.to(tl.float32)


@triton.jit
def _verify_conv_kernel(x_ptr, w_ptr, y_ptr, cu_ptr, st_ptr, slot_ptr, init_ptr, ts_ptr, map_ptr, C, SX,
                        K: tl.constexpr, KP: tl.constexpr, BC: tl.constexpr, MAP: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = c < C
    xc = _x_cols(map_ptr, c, cm, MAP)                 # input columns (with a column map: grouped x)
    i = tl.arange(0, KP)
    bos = tl.load(cu_ptr + b).to(tl.int64)
    eos = tl.load(cu_ptr + b + 1).to(tl.int64)
    # per-column copies of the scalars (scalar masks upset the interpreter)
    slot = tl.load(slot_ptr + b + 0 * i).to(tl.int64)
    old_ok = (tl.load(init_ptr + b + 0 * i) != 0) & (slot >= 0)
    w = tl.load(w_ptr + c[:, None] * K + i[None, :], mask=cm[:, None] & (i < K)[None, :], other=0.0).to(tl.float32)
    sdt = st_ptr.dtype.element_ty
    for t in range(bos, eos):
        acc = tl.sum(_window(x_ptr, st_ptr, c, xc, cm, i, t, bos, slot, old_ok, C, SX, K - 1, K) * w, 1)   # [BC]
        tl.store(y_ptr + t * C + c, (acc / (1.0 + tl.exp(-acc))).to(y_ptr.dtype.element_ty), mask=cm)
        dst = tl.load(ts_ptr + t + 0 * i)
        win = _window(x_ptr, st_ptr, c, xc, cm, i, t, bos, slot, old_ok, C, SX, K - 1, K - 1)
        tl.store(st_ptr + (dst[None, :] * C + c[:, None]) * (K - 1) + i[None, :], win.to(sdt),
                 mask=cm[:, None] & ((i < K - 1) & (dst >= 0))[None, :])
    win = _window(x_ptr, st_ptr, c, xc, cm, i, eos - 1, bos, slot, old_ok, C, SX, K - 1, K - 1)
    # every thread's reads of the old window are done before any column is overwritten
    tl.debug_barrier()
    tl.store(st_ptr + (slot[None, :] * C + c[:, None]) * (K - 1) + i[None, :], win.to(sdt),
             mask=cm[:, None] & ((i < K - 1) & (slot >= 0))[None, :])


@triton.jit
def _verify_rec_kernel(mc_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, o_ptr, cu_ptr, st_ptr, slot_ptr, init_ptr,
                       pts_ptr, SA, SB, scale,
                       HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HV
    h = bh % HV
    hk = h // (HV // HK)
    C = 2 * HK * DK + HV * DV
    bos = tl.load(cu_ptr + b).to(tl.int64)
    eos = tl.load(cu_ptr + b + 1).to(tl.int64)
    ck = tl.arange(0, DK)
    cv = iv * BV + tl.arange(0, BV)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    sp = st_ptr + ((slot * HV + h) * DK + ck[:, None]) * DV + cv[None, :]
    S = tl.zeros([DK, BV], dtype=tl.float32)
    if (slot >= 0) & (tl.load(init_ptr + b) != 0):
        S = tl.load(sp).to(tl.float32)
    sdt = st_ptr.dtype.element_ty
    neg_a = -tl.exp(tl.load(alog_ptr + h).to(tl.float32))
    dtb = tl.load(dtb_ptr + h).to(tl.float32)
    for t in range(bos, eos):
        q = tl.load(mc_ptr + t * C + hk * DK + ck).to(tl.float32)
        k = tl.load(mc_ptr + t * C + HK * DK + hk * DK + ck).to(tl.float32)
        v = tl.load(mc_ptr + t * C + 2 * HK * DK + h * DV + cv).to(tl.float32)
        q = q / tl.sqrt(tl.sum(q * q, 0) + 1e-6) * scale
        k = k / tl.sqrt(tl.sum(k * k, 0) + 1e-6)
        x = tl.load(a_ptr + t * SA + h).to(tl.float32) + dtb
        g = neg_a * tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
        # beta in b's dtype first, as the reference computes sigmoid(b) before upcasting
        bl = tl.load(b_ptr + t * SB + h)
        beta = (1.0 / (1.0 + tl.exp(-bl.to(tl.float32)))).to(bl.dtype).to(tl.float32)
        S = S * tl.exp(g)
        vhat = tl.sum(S * k[:, None], 0)
        S = S + k[:, None] * (beta * (v - vhat))[None, :]
        tl.store(o_ptr + (t * HV + h) * DV + cv, tl.sum(S * q[:, None], 0).to(o_ptr.dtype.element_ty))
        ps = tl.load(pts_ptr + t)
        if ps >= 0:
            tl.store(st_ptr + ((ps * HV + h) * DK + ck[:, None]) * DV + cv[None, :], S.to(sdt))
    if slot >= 0:
        tl.store(sp, S.to(sdt))


def gdn_verify(m, a, b, conv_weight, conv_state, recurrent_state, cu_seqlens, state_slots, has_initial_state,
               per_token_state_slots, A_log, dt_bias, num_k_heads: int, *, m_cols: torch.Tensor | None = None,
               bv: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """kernels/gdn.py's `gdn_cached` with per_token_state_slots [T] (-1 = skip; slots other than the
    state slots): m [T, conv_dim] pre-conv (any row stride; with m_cols [conv_dim] channel c is
    m[:, m_cols[c]]), a, b [T, Hv] (any row stride) -> o [T, Hv, dv] in m's dtype; both states
    updated in place at state_slots and stored per token."""
    T = m.shape[0]
    HV, DK, DV = recurrent_state.shape[1:]
    HK, K, C = num_k_heads, conv_weight.shape[-1], conv_weight.shape[0]
    if C != 2 * HK * DK + HV * DV:
        raise ValueError(f"m has {C} channels, expected 2*{HK}*{DK} + {HV}*{DV}")
    o = torch.empty(T, HV, DV, dtype=m.dtype, device=m.device)
    B = cu_seqlens.numel() - 1
    if T == 0 or B == 0:
        return o
    dev = m.device
    cu = cu_seqlens.to(torch.int64).contiguous()
    slots = state_slots.to(torch.int64).contiguous()
    init = (has_initial_state if has_initial_state is not None
            else torch.ones(B, dtype=torch.bool, device=dev)).contiguous()
    pts = per_token_state_slots.to(torch.int64).contiguous()
    m, SX, xmap, map_run = _inputs(m, C, m_cols)
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    mc = torch.empty(T, C, dtype=m.dtype, device=dev)
    BC = 256
    _verify_conv_kernel[(B, triton.cdiv(C, BC))](m, conv_weight.reshape(C, K).contiguous(), mc, cu, conv_state,
                                                 slots, init, pts, xmap, C, SX, K=K, KP=pow2(K, 2), BC=BC,
                                                 MAP=map_run, num_warps=4)
    # few sequences: narrow state tiles on fewer warps, so more programs stream the state (as decode)
    small = B < 16
    bv = min(bv or (16 if small else 64), DV)
    _verify_rec_kernel[(triton.cdiv(DV, bv), B * HV)](
        mc, a, b, A_log, dt_bias, o, cu, recurrent_state, slots, init, pts, a.stride(0), b.stride(0), DK ** -0.5,
        HK=HK, HV=HV, DK=DK, DV=DV, BV=bv, num_warps=num_warps or (2 if small else 4))
    return o
