"""DeltaNet pre-processing between the conv and the chunked delta rule, in one launch, and the
cached DeltaNet core (`gdn_cached`, kernels/gdn.py's signature) built on it for the GPU.

`qkv_gates_` takes the post-conv mc [T, conv_dim] ([q_all | k_all | v_all]) and the raw a / b
logits, L2-normalises q (and scales it by dk^-0.5) and k *in place* in mc's columns (fp32 math,
one rounding to mc's dtype, as the reference's fp32 q / k are rounded when the delta rule casts
them), writes g = -exp(A_log) softplus(a + dt_bias) and beta = sigmoid(b) as fp32 [T, Hv], and
returns q, k, v as row-strided views of mc: the delta rule reads them in place (no split, reshape,
cast or contiguous copies). The reference is kernels/gdn.py's `qkv_gates`. With FUSE_QK_NORM
`gdn_cached` has the conv's epilogue normalise q / k (its tiles hold whole heads) and this kernel
only writes the gates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...env_switches import switch
from ._util import pow2
from .conv1d import NORM_BC, causal_conv1d_varlen
from .delta_rule import gated_delta_rule_chunked
from .norm import gated_rmsnorm

# q / k norms in the conv epilogue (else in the prep kernel): the DeltaNet layer's 8K prefill 1.69 ->
# 1.65 ms on the H200; the 8-layer slice 32.48 -> 32.18 and 32.72 -> 32.79 ms in two runs (session 4)
FUSE_QK_NORM = True
# On by default since its H200 check (session 4: the fused tests, verify / decode graphs, 8K prefill
# of the slice 34.76 -> 32.48 ms); QWEN3NEXT_GDN_FUSED=0 is the kill switch: gdn_cached then runs
# kernels/gdn.py's composition of the single kernels (session 2's path: torch glue for the norms
# and gates, the recurrent kernel for verify)
FUSED = switch("QWEN3NEXT_GDN_FUSED") == "1"
# the layer's gated RMSNorm (`norm`) in the chunked delta rule's output kernel, o never stored
# unnormalised (QWEN3NEXT_GDN_NORM_FUSED=0: the norm kernel after it; the same bits either way)
NORM_FUSED = switch("QWEN3NEXT_GDN_NORM_FUSED") == "1"


@triton.jit(do_not_specialize=["T", "SM", "SA", "SB"])
def _prep_kernel(mc_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, g_ptr, beta_ptr, T, SM, SA, SB, scale,
                 HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
                 BR: tl.constexpr, DO_QK: tl.constexpr):
    hk = tl.program_id(1)
    t = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)       # [BR] tokens
    tm = t < T
    if DO_QK:
        ck = tl.arange(0, DK)
        qp = mc_ptr + t[:, None] * SM + hk * DK + ck[None, :]         # [BR, DK] this key head's q
        kp = qp + HK * DK
        q = tl.load(qp, mask=tm[:, None], other=0.0).to(tl.float32)
        k = tl.load(kp, mask=tm[:, None], other=0.0).to(tl.float32)
        q = q / tl.sqrt(tl.sum(q * q, 1) + 1e-6)[:, None] * scale
        k = k / tl.sqrt(tl.sum(k * k, 1) + 1e-6)[:, None]
        tl.store(qp, q.to(mc_ptr.dtype.element_ty), mask=tm[:, None])
        tl.store(kp, k.to(mc_ptr.dtype.element_ty), mask=tm[:, None])
    # gates of this key head's R value heads  [BR, RP]
    j = tl.arange(0, RP)
    h = hk * R + j
    gm = tm[:, None] & (j < R)[None, :]
    x = (tl.load(a_ptr + t[:, None] * SA + h[None, :], mask=gm, other=0.0).to(tl.float32)
         + tl.load(dtb_ptr + h, mask=j < R, other=0.0).to(tl.float32)[None, :])
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
    g = -tl.exp(tl.load(alog_ptr + h, mask=j < R, other=0.0).to(tl.float32))[None, :] * softplus
    tl.store(g_ptr + t[:, None] * HV + h[None, :], g, mask=gm)
    # beta rounded to b's dtype first, as the reference computes sigmoid(b) before upcasting
    bl = tl.load(b_ptr + t[:, None] * SB + h[None, :], mask=gm, other=0.0)
    beta = (1.0 / (1.0 + tl.exp(-bl.to(tl.float32)))).to(bl.dtype).to(tl.float32)
    tl.store(beta_ptr + t[:, None] * HV + h[None, :], beta, mask=gm)


def _unit_cols(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def qkv_gates_(mc, a, b, A_log, dt_bias, num_k_heads: int, head_k_dim: int, num_v_heads: int, head_v_dim: int,
               *, normed: bool = False):
    """mc [T, conv_dim] post-conv (unit column stride; its q / k columns are normalised IN PLACE,
    unless `normed`: the conv did it); a, b [T, Hv] (any row stride) -> q, k [T, Hk, dk],
    v [T, Hv, dv] views of mc, g, beta [T, Hv] fp32."""
    T, C = mc.shape
    HK, DK, HV, DV = num_k_heads, head_k_dim, num_v_heads, head_v_dim
    if C != 2 * HK * DK + HV * DV:
        raise ValueError(f"mc has {C} channels, expected 2*{HK}*{DK} + {HV}*{DV}")
    if mc.stride(-1) != 1:
        raise ValueError("mc must have a unit column stride (it is normalised in place)")
    a, b = _unit_cols(a), _unit_cols(b)
    g = torch.empty(T, HV, dtype=torch.float32, device=mc.device)
    beta = torch.empty_like(g)
    if T:
        R = HV // HK
        BR = max(1, min(16, 2048 // pow2(DK)))
        _prep_kernel[(triton.cdiv(T, BR), HK)](mc, a, b, A_log, dt_bias, g, beta, T, mc.stride(0), a.stride(0),
                                               b.stride(0), DK ** -0.5, HK=HK, HV=HV, DK=DK, R=R,
                                               RP=pow2(R, 1), BR=BR, DO_QK=not normed, num_warps=4)
    kd = HK * DK
    q, k, v = mc[:, :kd].view(T, HK, DK), mc[:, kd:2 * kd].view(T, HK, DK), mc[:, 2 * kd:].view(T, HV, DV)
    return q, k, v, g, beta


def gdn_cached(m, a, b, conv_weight, conv_state, recurrent_state, cu_seqlens, state_slots, has_initial_state,
               per_token_state_slots, A_log, dt_bias, num_k_heads: int, *,
               m_cols: torch.Tensor | None = None, norm=None) -> torch.Tensor:
    """kernels/gdn.py's `gdn_cached` on the GPU: the fused verify kernel for per-token states
    (gdn_verify.py), else conv -> `qkv_gates_` -> chunked delta rule -> o [T, Hv, dv].
    m_cols [conv_dim] (optional): channel c of the conv input is m[:, m_cols[c]] (read in place).
    norm (z, weight, eps) (optional): o through the layer's gated RMSNorm (z's rows of dv, as the
    layer's view), inside the delta rule's output kernel when NORM_FUSED, else after it."""
    Hv, dk, dv = recurrent_state.shape[1:]
    if not FUSED:
        from .. import gdn

        m = m if m_cols is None else m.index_select(1, m_cols)
        return _norm_after(gdn.gdn_cached(m, a, b, conv_weight, conv_state, recurrent_state, cu_seqlens,
                                          state_slots, has_initial_state, per_token_state_slots, A_log, dt_bias,
                                          num_k_heads), norm)
    if per_token_state_slots is not None:
        from .gdn_verify import gdn_verify

        return _norm_after(gdn_verify(m, a, b, conv_weight, conv_state, recurrent_state, cu_seqlens, state_slots,
                                      has_initial_state, per_token_state_slots, A_log, dt_bias, num_k_heads,
                                      m_cols=m_cols), norm)
    # the q / k norms inside the conv's epilogue when its tiles hold whole heads
    fuse = FUSE_QK_NORM and NORM_BC % dk == 0
    mc = causal_conv1d_varlen(m, conv_weight, cu_seqlens, conv_state, state_slots, has_initial_state,
                              x_cols=m_cols, qk_heads=(num_k_heads, dk) if fuse else None)
    q, k, v, g, beta = qkv_gates_(mc, a, b, A_log, dt_bias, num_k_heads, dk, Hv, dv, normed=fuse)
    o = gated_delta_rule_chunked(q, k, v, g, beta, cu_seqlens, recurrent_state, state_slots, has_initial_state,
                                 norm=norm if NORM_FUSED else None)
    return o if NORM_FUSED else _norm_after(o, norm)


def _norm_after(o: torch.Tensor, norm) -> torch.Tensor:
    """o [T, Hv, dv] through the gated RMSNorm `norm` = (z, weight, eps) (None: o as it is)."""
    if norm is None:
        return o
    z, weight, eps = norm
    return gated_rmsnorm(o.view(z.shape), z, weight, eps).view(o.shape)
