"""One decode step of the Gated DeltaNet mixer core, fused: conv update -> L2 norm -> gating ->
delta-rule recurrence, in place on each sequence's state slots.

`gdn_decode` takes the pre-conv projection m [B, conv_dim] ([q_all | k_all | v_all]), the raw
b / a logits [B, Hv], and returns o [B, Hv, dv] (before the gated norm). Two launches: the conv
update (it shifts the conv state, which every head program of a sequence would otherwise race
on), then one program per (sequence, v-head, dv block) that normalises q/k, computes
g = -exp(A_log) softplus(a + dt_bias) and beta = sigmoid(b), and updates its [dk, BV] tile of
the state once: loaded to fp32 from the pool (fp32, bf16 or fp16: mamba_ssm_cache_dtype), computed
in fp32, rounded to the pool's dtype on store. The plain-torch definition is
`gdn_decode_ref.gdn_decode_reference`.

PIPELINED (opt-in: QWEN3NEXT_GDN_DECODE_PIPELINED=1, or `variant="pipelined"`) swaps the second
launch for `_decode_pipe_kernel`: each program walks ITEMS consecutive (v-head, dv tile) items of
one sequence in a loop whose state loads Triton pipelines (cp.async into shared memory, `stages`
deep), so the next tile streams in while this one computes; tiles are narrow (default 128 x 16 on
one warp: 8 key rows per thread, the key-dim sums inside one warp) and q / k enter
unnormalised, their norms folded into per-column scalars. Not yet measured on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...env_switches import switch
from .conv1d import causal_conv1d_update

PIPELINED = switch("QWEN3NEXT_GDN_DECODE_PIPELINED") == "1"
# the pipelined kernel's defaults: dv tile, warps, items per program (at most), pipeline stages
PIPE_BV, PIPE_WARPS, PIPE_ITEMS, PIPE_STAGES = 16, 1, 8, 3
# (bv, num_warps, items, stages) the GPU benchmark times and check_mixers_compile.py compiles. In the
# sm_90 SASS, stages = 2 issues the next item's copies after this item's math and waits for them at
# the loop top (no overlap); from 3 up, stages - 2 items stream in while one computes. (32, 1, ...):
# 16 key rows per thread, 11 instead of 14 instructions per state element (fewer shuffles).
PIPE_SWEEP = [(16, 1, 8, 3), (16, 1, 8, 2), (16, 1, 8, 4), (16, 1, 4, 3), (16, 1, 16, 3), (8, 1, 8, 3),
              (8, 1, 8, 4), (32, 1, 8, 3), (32, 1, 8, 2), (32, 4, 8, 3), (64, 4, 4, 3), (64, 8, 4, 3)]


@triton.jit
def _decode_kernel(m_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, st_ptr, slot_ptr, o_ptr, scale, SA, SB,
                   HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   BV: tl.constexpr):
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HV).to(tl.int64)
    h = bh % HV
    hk = h // (HV // HK)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    if slot >= 0:
        C = 2 * HK * DK + HV * DV
        ck = tl.arange(0, DK)
        cv = iv * BV + tl.arange(0, BV)
        sp = st_ptr + ((slot * HV + h) * DK + ck[:, None]) * DV + cv[None, :]
        S = tl.load(sp).to(tl.float32)                                # [DK, BV], issued first
        q = tl.load(m_ptr + b * C + hk * DK + ck).to(tl.float32)
        k = tl.load(m_ptr + b * C + HK * DK + hk * DK + ck).to(tl.float32)
        v = tl.load(m_ptr + b * C + 2 * HK * DK + h * DV + cv).to(tl.float32)
        q = q / tl.sqrt(tl.sum(q * q, 0) + 1e-6) * scale
        k = k / tl.sqrt(tl.sum(k * k, 0) + 1e-6)
        x = tl.load(a_ptr + b * SA + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32)
        softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
        g = -tl.exp(tl.load(alog_ptr + h).to(tl.float32)) * softplus
        # beta in b's dtype first, as the layer computes sigmoid(b) before upcasting
        bl = tl.load(b_ptr + b * SB + h)
        beta = (1.0 / (1.0 + tl.exp(-bl.to(tl.float32)))).to(bl.dtype).to(tl.float32)
        S = S * tl.exp(g)
        vhat = tl.sum(S * k[:, None], 0)
        S = S + k[:, None] * (beta * (v - vhat))[None, :]
        tl.store(o_ptr + (b * HV + h) * DV + cv, tl.sum(S * q[:, None], 0).to(o_ptr.dtype.element_ty))
        tl.store(sp, S.to(st_ptr.dtype.element_ty))                  # fp32, or rounded to bf16 / fp16
    else:
        # a padded row (CUDA-graph batch): no state, but a finite output for the layers after
        tl.store(o_ptr + (b * HV + h) * DV + iv * BV + tl.arange(0, BV), tl.zeros([BV], dtype=o_ptr.dtype.element_ty))


@triton.jit
def _decode_pipe_kernel(m_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, st_ptr, slot_ptr, o_ptr, scale, SA, SB,
                        HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                        BV: tl.constexpr, ITEMS: tl.constexpr, STAGES: tl.constexpr):
    NT: tl.constexpr = DV // BV
    pid = tl.program_id(0)
    b = (pid // (HV * NT // ITEMS)).to(tl.int64)
    first = (pid % (HV * NT // ITEMS)) * ITEMS        # items (v-head, dv tile), dv tile fastest
    slot = tl.load(slot_ptr + b).to(tl.int64)
    if slot >= 0:
        C = 2 * HK * DK + HV * DV
        ck = tl.arange(0, DK)
        for j in tl.range(ITEMS, num_stages=STAGES):
            h = (first + j) // NT
            hk = h // (HV // HK)
            cv = ((first + j) % NT) * BV + tl.arange(0, BV)
            sp = st_ptr + ((slot * HV + h) * DK + ck[:, None]) * DV + cv[None, :]
            S = tl.load(sp).to(tl.float32)                                          # [DK, BV]
            q = tl.load(m_ptr + b * C + hk * DK + ck).to(tl.float32)[:, None]         # [DK, 1] raw
            k = tl.load(m_ptr + b * C + HK * DK + hk * DK + ck).to(tl.float32)[:, None]
            v = tl.load(m_ptr + b * C + 2 * HK * DK + h * DV + cv).to(tl.float32)     # [BV]
            x = tl.load(a_ptr + b * SA + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32)
            softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
            decay = tl.exp(-tl.exp(tl.load(alog_ptr + h).to(tl.float32)) * softplus)
            bl = tl.load(b_ptr + b * SB + h)
            beta = (1.0 / (1.0 + tl.exp(-bl.to(tl.float32)))).to(bl.dtype).to(tl.float32)
            rk = 1.0 / tl.sqrt(tl.sum(k * k) + 1e-6)
            rq = scale / tl.sqrt(tl.sum(q * q) + 1e-6)
            # with k_n = rk k, q_n = rq q: vhat = decay S^T k_n, o = S_new^T q_n
            #   = rq (decay S^T q + (k_n . q) delta): one pass over the old S serves both sums
            sk = tl.sum(S * k, 0)
            sq = tl.sum(S * q, 0)
            delta = beta * (v - decay * rk * sk)
            o = rq * (decay * sq + (rk * tl.sum(k * q)) * delta)
            tl.store(o_ptr + (b * HV + h) * DV + cv, o.to(o_ptr.dtype.element_ty))
            tl.store(sp, (S * decay + (k * rk) * delta[None, :]).to(st_ptr.dtype.element_ty))
    else:
        # a padded row: this program's items are one contiguous stretch of o[b]
        tl.store(o_ptr + b * HV * DV + first * BV + tl.arange(0, ITEMS * BV),
                 tl.zeros([ITEMS * BV], dtype=o_ptr.dtype.element_ty))


def gdn_decode(m, a, b, conv_weight, conv_state, recurrent_state, state_slots, A_log, dt_bias,
               num_k_heads: int, *, m_cols: torch.Tensor | None = None, bv: int | None = None,
               num_warps: int | None = None, variant: str | None = None, items: int | None = None,
               stages: int | None = None) -> torch.Tensor:
    """m [B, conv_dim] pre-conv (m_cols as in conv1d.causal_conv1d_update); a, b [B, Hv] (any row
    stride); conv_state [N, conv_dim, K-1]; recurrent_state [N, Hv, dk, dv] fp32 / bf16 / fp16 (math
    in fp32); state_slots [B] (negative = skip: o = 0) -> o [B, Hv, dv].

    variant "tiles" (default) or "pipelined" (None: the PIPELINED flag); items / stages: the
    pipelined kernel's items per program (a power of two, at most) and pipeline depth."""
    B, C = m.shape[0], conv_weight.shape[0]
    HV, DK, DV = recurrent_state.shape[1:]
    HK = num_k_heads
    if C != 2 * HK * DK + HV * DV:
        raise ValueError(f"m has {C} channels, expected 2*{HK}*{DK} + {HV}*{DV}")
    variant = variant or ("pipelined" if PIPELINED else "tiles")
    if variant not in ("tiles", "pipelined"):
        raise ValueError(f"variant must be 'tiles' or 'pipelined', got {variant!r}")
    mc = causal_conv1d_update(m, conv_weight, conv_state, state_slots, x_cols=m_cols)   # [B, C] post-conv
    o = torch.empty(B, HV, DV, dtype=m.dtype, device=m.device)
    if B and variant == "pipelined":
        _launch_pipelined(mc, a, b, A_log, dt_bias, recurrent_state, state_slots, o, HK, bv, num_warps, items, stages)
    elif B:
        # small batches: narrow state tiles on fewer warps, so more programs stream the state at
        # once (measured at B = 1: 16 / 2 warps 6.5 us, 64 / 4 warps 8.0 us per layer)
        small = B < 16
        bv = min(bv or (16 if small else 64), DV)
        num_warps = num_warps or (2 if small else 4)
        a = a if a.stride(-1) == 1 else a.contiguous()
        b = b if b.stride(-1) == 1 else b.contiguous()
        _decode_kernel[(triton.cdiv(DV, bv), B * HV)](
            mc, a, b, A_log, dt_bias, recurrent_state,
            state_slots.to(torch.int64).contiguous(), o, DK ** -0.5, a.stride(0), b.stride(0),
            HK=HK, HV=HV, DK=DK, DV=DV, BV=bv, num_warps=num_warps)
    return o


def _launch_pipelined(mc, a, b, A_log, dt_bias, state, slots, o, HK, bv, num_warps, items, stages) -> None:
    """The recurrence of gdn_decode through _decode_pipe_kernel (mc post-conv [B, C]; o filled)."""
    B, (HV, DK, DV) = mc.shape[0], state.shape[1:]
    bv = min(bv or PIPE_BV, DV)
    if DV % bv:
        raise ValueError(f"bv={bv} does not divide head_v_dim {DV}")
    per_seq = HV * (DV // bv)
    # enough programs for every SM at small B (~512), at most `items` each; a divisor of per_seq
    n = max(1, min(items or PIPE_ITEMS, per_seq, B * per_seq // 512))
    n = 1 << (n.bit_length() - 1)
    while per_seq % n:
        n //= 2
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    _decode_pipe_kernel[(B * per_seq // n,)](
        mc, a, b, A_log, dt_bias, state, slots.to(torch.int64).contiguous(), o, DK ** -0.5, a.stride(0),
        b.stride(0), HK=HK, HV=HV, DK=DK, DV=DV, BV=bv, ITEMS=n, STAGES=stages or PIPE_STAGES,
        num_warps=num_warps or PIPE_WARPS)
