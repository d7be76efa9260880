"""The Gated DeltaNet core after the input projections (architecture.md §5.2-5.6), composed from
the single kernels: conv -> split -> q/k L2 norm (q also scaled) -> gates -> delta rule.

`qkv_gates` is the middle part every path shares. `gdn_cached` is the cached forward of a packed
varlen batch (prefill chunks, speculative verify with per-token states) as the model layer runs
it through kernels/ops.py; the fused C++ kernel (cpu_ext, `gdn_varlen`) computes the same thing
in one call, and ops.gdn_cached picks between them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim (eps inside the sqrt)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def qkv_gates(mc, a, b, A_log, dt_bias, num_k_heads: int, head_k_dim: int, num_v_heads: int, head_v_dim: int):
    """mc [T, conv_dim] post-conv [q_all | k_all | v_all]; a, b [T, Hv] ->
    q, k [T, Hk, dk] fp32 (normalised, q scaled by dk^-0.5), v [T, Hv, dv], g, beta [T, Hv] fp32."""
    T, kd = mc.shape[0], num_k_heads * head_k_dim
    q, k, v = torch.split(mc, [kd, kd, num_v_heads * head_v_dim], dim=-1)
    q = l2norm(q.reshape(T, num_k_heads, head_k_dim).float()) * head_k_dim ** -0.5
    k = l2norm(k.reshape(T, num_k_heads, head_k_dim).float())
    beta = torch.sigmoid(b).float()
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return q, k, v.reshape(T, num_v_heads, head_v_dim), g, beta


def gdn_cached(m, a, b, conv_weight, conv_state, recurrent_state, cu_seqlens, state_slots, has_initial_state,
               per_token_state_slots, A_log, dt_bias, num_k_heads: int) -> torch.Tensor:
    """m [T, conv_dim] pre-conv; a, b [T, Hv]; conv_weight [C, K]; conv_state [N, C, K-1] and
    recurrent_state [N, Hv, dk, dv] (fp32, bf16 or fp16: computed in fp32, rounded on store) updated
    in place at state_slots [B]; has_initial_state [B] bool; per_token_state_slots [T] long or None
    (also store both states after each token there, -1 = skip) -> o [T, Hv, dv] in m's dtype."""
    from . import ops  # the single kernels, each dispatched on its own

    Hv, dk, dv = recurrent_state.shape[1:]
    if per_token_state_slots is not None:  # before the conv below moves the states on
        ops.save_token_windows(m, cu_seqlens, conv_state, state_slots, has_initial_state, per_token_state_slots)
    mc = ops.causal_conv1d_varlen(m, conv_weight, cu_seqlens, conv_state, state_slots, has_initial_state)
    q, k, v, g, beta = qkv_gates(mc, a, b, A_log, dt_bias, num_k_heads, dk, Hv, dv)
    if per_token_state_slots is not None:
        return ops.gated_delta_rule_recurrent(q, k, v, g, beta, cu_seqlens, recurrent_state, state_slots,
                                              has_initial_state, per_token_state_slots=per_token_state_slots)
    return ops.gated_delta_rule_chunked(q, k, v, g, beta, cu_seqlens, recurrent_state, state_slots,
                                        has_initial_state)
