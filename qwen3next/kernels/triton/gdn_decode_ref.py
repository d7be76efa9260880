"""The plain-torch definition of the fused DeltaNet decode step (`gdn_decode.gdn_decode`), as the
model layer runs it: conv update -> split -> L2 norm (q also scaled) -> gates -> recurrence.
The recurrent state pool may be fp32, bf16 or fp16: the recurrence (delta_rule.py) loads it to
fp32 and rounds the new state to the pool's dtype on store, as the Triton kernel does.

Kept free of triton imports so kernels/ops.py can fall back to it on machines without triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import conv1d, delta_rule


def gdn_decode_reference(m, a, b, conv_weight, conv_state, recurrent_state, state_slots, A_log, dt_bias,
                         num_k_heads: int) -> torch.Tensor:
    """The same step as the model layer runs it through the plain-torch kernels."""
    B = m.shape[0]
    HV, DK, DV = recurrent_state.shape[1:]
    HK = num_k_heads
    mc = conv1d.causal_conv1d_update(m, conv_weight, conv_state, state_slots)
    q, k, v = torch.split(mc, [HK * DK, HK * DK, HV * DV], dim=-1)
    q = _l2(q.reshape(B, HK, DK).float()) * DK ** -0.5
    k = _l2(k.reshape(B, HK, DK).float())
    beta = torch.sigmoid(b).float()
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    cu = torch.arange(B + 1, device=m.device)
    has = torch.ones(B, dtype=torch.bool, device=m.device)
    return delta_rule.gated_delta_rule_recurrent(q, k, v.reshape(B, HV, DV), g, beta, cu,
                                                 recurrent_state, state_slots, has)


def _l2(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim, as the layer's l2norm."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)
