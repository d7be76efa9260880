"""The kernel dispatch layer the model layers call.

Today every name is the plain-torch reference; the GPU work adds Triton choices here (same
signatures) when the inputs live on CUDA.
"""

from .attention import causal_attention, paged_attention, write_kv
from .conv1d import causal_conv1d_update, causal_conv1d_varlen
from .delta_rule import gated_delta_rule_chunked, gated_delta_rule_recurrent
from .moe import moe_experts, moe_route
from .norm import gated_rmsnorm, zc_rmsnorm
from .rotary import apply_rotary, rope_cos_sin, rope_inv_freq

__all__ = [
    "apply_rotary", "causal_attention", "causal_conv1d_update", "causal_conv1d_varlen",
    "gated_delta_rule_chunked", "gated_delta_rule_recurrent", "gated_rmsnorm", "moe_experts",
    "moe_route", "paged_attention", "rope_cos_sin", "rope_inv_freq", "write_kv", "zc_rmsnorm",
]
