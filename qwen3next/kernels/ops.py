"""The kernel dispatch layer the model layers call.

Each name runs the Triton kernel (kernels/triton/, same signature) when its tensors live on CUDA,
triton imports, no autograd is needed (the Triton kernels are forward-only) and the shapes suit
the kernel's blocks; otherwise, when no gradient is wanted, the batched CPU variant (cpu_fast.py,
same signature) where there is one, else the plain-torch reference. On CPU in float32 the fused C++
kernels (cpu_ext/: the DeltaNet core, paged attention) go first when they build; QWEN3NEXT_CPU_EXT=0
switches them off, QWEN3NEXT_KERNELS=torch forces the references everywhere (debugging, A/B timing).
"""

from __future__ import annotations

import functools
import os

import torch

from . import attention as _ref_attn
from . import cpu_ext as _ext
from . import cpu_fast as _fast
from . import conv1d as _ref_conv
from . import delta_rule as _ref_dr
from . import fp8 as _ref_fp8
from . import gdn as _gdn
from . import moe as _ref_moe
from . import norm as _ref_norm
from .attention import causal_attention
from . import rotary as _ref_rotary
from .rotary import rope_cos_sin, rope_inv_freq

__all__ = [
    "apply_rotary", "causal_attention", "causal_conv1d_update", "causal_conv1d_varlen",
    "gate_output", "gated_delta_rule_chunked", "gated_delta_rule_recurrent", "gated_rmsnorm", "gdn_cached",
    "gdn_decode", "norm_rotary", "qkv_gates",
    "moe_dense_act", "moe_dense_pays", "moe_experts", "moe_experts_shared", "moe_experts_shared_ok",
    "moe_route", "paged_attention", "fp8_linear", "moe_experts_fp8",
    "rope_cos_sin", "rope_inv_freq", "save_token_windows", "write_kv", "zc_rmsnorm",
]


@functools.lru_cache(maxsize=1)
def _triton_ok() -> bool:
    if os.environ.get("QWEN3NEXT_KERNELS", "").lower() == "torch":
        return False
    from .triton import available

    return available()


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _use_triton(*tensors) -> bool:
    """CUDA inputs, no gradient wanted, triton present."""
    x = tensors[0]
    if not x.is_cuda or not _triton_ok():
        return False
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return False
    return True


def _use_fast(*tensors) -> bool:
    """Off CUDA, no gradient wanted, references not forced: the batched CPU variants (cpu_fast.py)."""
    if _ext.env("QWEN3NEXT_KERNELS").lower() == "torch":
        return False
    return not (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors))


def cpu_fast_ok(*tensors) -> bool:
    """Layers' own CPU shortcuts (fused projections) apply: CPU tensors, cpu_fast allowed, and no
    Triton kernel about to take their (strided) outputs."""
    return tensors[0].device.type == "cpu" and not _use_triton(*tensors) and _use_fast(*tensors)


def _triton(name: str):
    """The Triton module `name` (imported on first use, so CPU-only runs never import triton)."""
    import importlib

    return importlib.import_module(f"{__package__}.triton.{name}")


def _ext_ok(*tensors) -> bool:
    """The C++ CPU kernels take these: CPU float32, no gradient wanted, built and not switched off
    (cpu_ext.usable reads QWEN3NEXT_KERNELS too)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return _ext.usable(*tensors)


# Few-row projections (decode, speculative verify, MTP drafts): the C++ kernel reads each weight
# row once for all rows, where torch's matmul packs the weight first; faster up to ~16 rows here.
_LINEAR_MAX_ROWS = 8


def linear(x, w):
    """x [T, K] @ w[N, K]^T on the layers' CPU paths (cpu_fast_ok): C++ for few rows (each row's
    result then independent of the others), else torch."""
    if x.shape[0] <= _LINEAR_MAX_ROWS and _ext_ok(x, w) and _ext.linear_fits(x, w):
        return _ext.linear(x, w)
    return x @ w.t()


def zc_rmsnorm(x, weight, eps, residual=None):
    if _use_triton(x, weight, residual):
        return _triton("norm").zc_rmsnorm(x, weight, eps, residual)
    if _ext_ok(x, weight, residual) and (weight.dim() == 1 or x.shape[-2:] == weight.shape):
        return _ext.zc_rmsnorm(x, weight, eps, residual)
    return (_fast if _use_fast(x, weight, residual) else _ref_norm).zc_rmsnorm(x, weight, eps, residual)


def gated_rmsnorm(x, z, weight, eps):
    if _use_triton(x, z, weight):
        return _triton("norm").gated_rmsnorm(x, z, weight, eps)
    if _ext_ok(x, z, weight) and x.dim() == 3 and z.shape == x.shape:
        return _ext.gated_rmsnorm(x, z, weight, eps)
    return (_fast if _use_fast(x, z, weight) else _ref_norm).gated_rmsnorm(x, z, weight, eps)


def causal_conv1d_varlen(x, weight, cu_seqlens, conv_state=None, state_slots=None, has_initial_state=None):
    if _use_triton(x, weight):
        return _triton("conv1d").causal_conv1d_varlen(x, weight, cu_seqlens, conv_state, state_slots, has_initial_state)
    mod = _fast if _use_fast(x, weight) else _ref_conv
    return mod.causal_conv1d_varlen(x, weight, cu_seqlens, conv_state, state_slots, has_initial_state)


def save_token_windows(x, cu_seqlens, conv_state, state_slots, has_initial_state, token_slots):
    if _use_triton(x):  # one launch, no host sync (the verify forward can be graph-captured)
        return _triton("conv1d").save_token_windows(x, cu_seqlens, conv_state, state_slots, has_initial_state,
                                                    token_slots)
    return _ref_conv.save_token_windows(x, cu_seqlens, conv_state, state_slots, has_initial_state, token_slots)


def causal_conv1d_update(x, weight, conv_state, state_slots):
    if _use_triton(x, weight):
        return _triton("conv1d").causal_conv1d_update(x, weight, conv_state, state_slots)
    return (_fast if _use_fast(x, weight) else _ref_conv).causal_conv1d_update(x, weight, conv_state, state_slots)


# recurrent state pools the Triton DeltaNet kernels load to fp32 and round on store (mamba_ssm_cache_dtype)
_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _state_ok(S) -> bool:
    return _pow2(S.shape[-2]) and _pow2(S.shape[-1]) and S.dtype in _STATE_DTYPES


def _dr_ok(q, v, state) -> bool:
    return (_pow2(q.shape[-1]) and _pow2(v.shape[-1])
            and (state is None or state.dtype in _STATE_DTYPES))


def gated_delta_rule_chunked(q, k, v, g, beta, cu_seqlens, state=None, state_slots=None, has_initial_state=None):
    if _use_triton(q, k, v, g, beta) and _dr_ok(q, v, state):
        return _triton("delta_rule").gated_delta_rule_chunked(q, k, v, g, beta, cu_seqlens, state, state_slots,
                                                              has_initial_state)
    mod = _fast if _use_fast(q, k, v, g, beta) else _ref_dr
    return mod.gated_delta_rule_chunked(q, k, v, g, beta, cu_seqlens, state, state_slots, has_initial_state)


def gated_delta_rule_recurrent(q, k, v, g, beta, cu_seqlens, state=None, state_slots=None,
                               has_initial_state=None, per_token_state_slots=None):
    if _use_triton(q, k, v, g, beta) and _dr_ok(q, v, state) and (per_token_state_slots is None or state is not None):
        return _triton("delta_rule").gated_delta_rule_recurrent(q, k, v, g, beta, cu_seqlens, state, state_slots,
                                                                has_initial_state, per_token_state_slots)
    mod = _fast if _use_fast(q, k, v, g, beta) else _ref_dr
    return mod.gated_delta_rule_recurrent(q, k, v, g, beta, cu_seqlens, state, state_slots, has_initial_state,
                                          per_token_state_slots)


def gdn_decode(m, a, b, conv_weight, conv_state, recurrent_state, state_slots, A_log, dt_bias, num_k_heads,
               m_cols=None):
    """One fused DeltaNet decode step (conv update, L2 norm, gates, recurrence) -> o [B, Hv, dv];
    see kernels/triton/gdn_decode.py. Both states are updated in place at `state_slots`.
    m_cols [conv_dim] (optional): conv channel c is m[:, m_cols[c]] (Triton reads it in place)."""
    S = recurrent_state
    if _use_triton(m, a, b, conv_weight) and _state_ok(S):
        return _triton("gdn_decode").gdn_decode(m, a, b, conv_weight, conv_state, recurrent_state, state_slots,
                                                A_log, dt_bias, num_k_heads, m_cols=m_cols)
    if m_cols is not None:
        m = m.index_select(1, m_cols)
    if _ext_ok(m, a, b, conv_weight) and _ext.gdn_ok(m, a, b, conv_weight, conv_state, S, A_log, dt_bias):
        return _ext.gdn_varlen(m, a, b, conv_weight, conv_state, S, torch.arange(m.shape[0] + 1), state_slots,
                               None, None, A_log, dt_bias, num_k_heads)
    if _use_fast(m, a, b, conv_weight) and bool((state_slots >= 0).all()):
        return _fast.gdn_decode(m, a, b, conv_weight, conv_state, recurrent_state, state_slots, A_log, dt_bias,
                                num_k_heads)
    from .triton.gdn_decode_ref import gdn_decode_reference

    return gdn_decode_reference(m, a, b, conv_weight, conv_state, recurrent_state, state_slots, A_log, dt_bias,
                                num_k_heads)


def gdn_cached(m, a, b, conv_weight, conv_state, recurrent_state, cu_seqlens, state_slots, has_initial_state,
               per_token_state_slots, A_log, dt_bias, num_k_heads, m_cols=None, norm=None):
    """The cached DeltaNet core of a varlen batch (see kernels/gdn.py) -> o [T, Hv, dv]: the fused C++
    kernel on CPU, else the single kernels one by one. The C++ kernel runs the recurrence token by
    token; on one core it still beat the chunked torch path at every size measured (prefills of
    128-512 tokens, heads 16x16 up to 32 x 128x128: 1.6-7x faster).
    norm (z, weight, eps) (optional): o through the layer's gated RMSNorm (`gated_rmsnorm(o viewed as
    z, z, weight, eps)`); on CUDA inside the delta rule's output kernel (triton/gdn_prep.NORM_FUSED)."""
    S = recurrent_state
    if _use_triton(m, a, b, conv_weight) and _state_ok(S):
        # conv -> fused q/k norms + gates -> chunked delta rule (+ gated norm); verify: gdn_verify.py
        return _triton("gdn_prep").gdn_cached(m, a, b, conv_weight, conv_state, recurrent_state, cu_seqlens,
                                              state_slots, has_initial_state, per_token_state_slots, A_log,
                                              dt_bias, num_k_heads, m_cols=m_cols, norm=norm)
    o = _gdn_cached_cpu(m, a, b, conv_weight, conv_state, recurrent_state, cu_seqlens, state_slots,
                        has_initial_state, per_token_state_slots, A_log, dt_bias, num_k_heads, m_cols)
    if norm is None:
        return o
    z, weight, eps = norm
    return gated_rmsnorm(o.reshape(z.shape), z, weight, eps).reshape(o.shape)


def _gdn_cached_cpu(m, a, b, conv_weight, conv_state, recurrent_state, cu_seqlens, state_slots, has_initial_state,
                    per_token_state_slots, A_log, dt_bias, num_k_heads, m_cols):
    """gdn_cached off the Triton path: the C++ kernel, else kernels/gdn.py."""
    if m_cols is not None:  # (m_cols as in gdn_decode)
        m = m.index_select(1, m_cols)
    if _ext_ok(m, a, b, conv_weight) and _ext.gdn_ok(m, a, b, conv_weight, conv_state, recurrent_state, A_log,
                                                    dt_bias):
        return _ext.gdn_varlen(m, a, b, conv_weight, conv_state, recurrent_state, cu_seqlens, state_slots,
                               has_initial_state, per_token_state_slots, A_log, dt_bias, num_k_heads)
    return _gdn.gdn_cached(m, a, b, conv_weight, conv_state, recurrent_state, cu_seqlens, state_slots,
                           has_initial_state, per_token_state_slots, A_log, dt_bias, num_k_heads)


def qkv_gates(mc, a, b, A_log, dt_bias, num_k_heads, head_k_dim, num_v_heads, head_v_dim):
    """kernels/gdn.py's `qkv_gates`; on CUDA one launch that normalises q / k IN PLACE in mc and
    returns views of it (q / k then in mc's dtype): callers hand over mc."""
    if _use_triton(mc, a, b) and _pow2(head_k_dim) and mc.stride(-1) == 1:
        return _triton("gdn_prep").qkv_gates_(mc, a, b, A_log, dt_bias, num_k_heads, head_k_dim, num_v_heads,
                                              head_v_dim)
    return _gdn.qkv_gates(mc, a, b, A_log, dt_bias, num_k_heads, head_k_dim, num_v_heads, head_v_dim)


def paged_attention(q, kv_cache, block_tables, cu_seqlens, context_lens, scale, *, k=None, v=None,
                    fresh_lens=None):
    """Causal attention over the paged cache (new tokens already written) -> o [T, Hq, D]. On CUDA,
    k, v [T, Hkv, D] (the new rows) with fresh_lens (host list of new tokens per sequence, given only
    when no sequence has cached tokens) let a prefill skip the pages (cuDNN / TMA kernels)."""
    if _use_triton(q) and _pow2(q.shape[-1]) and kv_cache.dtype == q.dtype:
        return _triton("attention").paged_attention(q, kv_cache, block_tables, cu_seqlens, context_lens, scale,
                                                    k=k, v=v, fresh_lens=fresh_lens)
    if _ext_ok(q) and _ext.paged_attention_ok(q, kv_cache):
        return _ext.paged_attention(q, kv_cache, block_tables, cu_seqlens, context_lens, scale)
    return (_fast if _use_fast(q) else _ref_attn).paged_attention(q, kv_cache, block_tables, cu_seqlens, context_lens,
                                                                 scale)


def apply_rotary(x, cos, sin):
    if _use_triton(x, cos, sin) and x.dim() == 3:  # one launch instead of six torch ops
        return _triton("rotary").apply_rotary(x, cos, sin)
    if _ext_ok(x, cos, sin) and x.dim() == 3:
        return _ext.apply_rotary(x, cos, sin)
    return _ref_rotary.apply_rotary(x, cos, sin)


def norm_rotary(x, weight, eps, cos, sin):
    """apply_rotary(zc_rmsnorm(x, weight, eps), cos, sin): attention's q / k in one pass on CUDA."""
    if _use_triton(x, weight, cos, sin) and x.dim() == 3:
        return _triton("rotary").norm_rotary(x, weight, eps, cos, sin)
    return apply_rotary(zc_rmsnorm(x, weight, eps), cos, sin)


def gate_output(o, gate):
    """o * sigmoid(gate): the gated attention's output gate (one fused pass on CUDA and CPU)."""
    if _use_triton(o, gate):
        return _triton("attention").gate_output(o, gate)
    if _ext_ok(o, gate) and o.dim() == 3:
        return _ext.gate_output(o, gate)
    return o * torch.sigmoid(gate)


def write_kv(k, v, kv_cache, slot_mapping):
    if _use_triton(k, v):
        return _triton("attention").write_kv(k, v, kv_cache, slot_mapping)
    if _ext_ok(k, v, kv_cache) and kv_cache.is_contiguous():
        return _ext.write_kv(k, v, kv_cache, slot_mapping)
    return (_fast if _use_fast(k, v) else _ref_attn).write_kv(k, v, kv_cache, slot_mapping)


def moe_route(router_logits, top_k, norm_topk_prob):
    if _use_triton(router_logits):
        return _triton("moe").moe_route(router_logits, top_k, norm_topk_prob)
    if _ext_ok(router_logits) and 0 < top_k <= router_logits.shape[-1]:
        return _ext.moe_route(router_logits, top_k, norm_topk_prob)
    return _ref_moe.moe_route(router_logits, top_k, norm_topk_prob)


def moe_dense_act(y, shared_inter, num_experts, inter, top_k, norm_topk_prob):
    """The dense CPU MoE's routing and activations (cpu_fast.moe_dense_act; C++ when it builds)."""
    if _ext_ok(y):
        return _ext.moe_dense_act(y, shared_inter, num_experts, inter, top_k, norm_topk_prob)
    return _fast.moe_dense_act(y, shared_inter, num_experts, inter, top_k, norm_topk_prob)


# The C++ grouped loop (cpu_ext.moe_experts) costs about a quarter of the torch one per active
# expert: measured crossovers vs dense at T ~64 (tiny model) and below T = 1 (demo model, whose
# dense weights no longer stay in cache).
_EXT_FLOPS_PER_EXPERT = 400_000


def moe_dense_pays(T: int, E: int, k: int, H: int, inter: int) -> bool:
    """CPU MoE: whether every expert on every token beats the grouped loop that would run here."""
    if _ext.usable():
        return _fast.moe_dense_pays(T, E, k, H, inter, _EXT_FLOPS_PER_EXPERT)
    return _fast.moe_dense_pays(T, E, k, H, inter)


def _dense_moe_pays(x, gate_up_proj, ids) -> bool:
    T, k = ids.shape
    E, I2, H = gate_up_proj.shape
    return moe_dense_pays(T, E, k, H, I2 // 2)


def moe_experts(x, gate_up_proj, down_proj, weights, ids, gated=None):
    """Routed experts; `gated` = (sh [T, H], g [T, 1]) adds sigmoid(g) * sh (the MoE block's shared
    expert; on the expert-sorted path in the same pass as the k-sum, else with torch ops)."""
    if _use_triton(x, gate_up_proj, down_proj, weights) and gate_up_proj.dtype == x.dtype == down_proj.dtype:
        # prefill-sized batches: grouped GEMMs over expert-sorted rows (moe_grouped.py)
        gemm = _triton("moe_grouped").sorted_gemm(x, gate_up_proj, down_proj, ids.numel())
        if gemm:
            return _triton("moe_grouped").moe_experts_sorted(x, gate_up_proj, down_proj, weights, ids, gemm=gemm,
                                                             gated=gated)
        out = _triton("moe").moe_experts(x, gate_up_proj, down_proj, weights, ids)
    elif _ext_ok(x, gate_up_proj, down_proj, weights) and not _dense_moe_pays(x, gate_up_proj, ids):
        out = _ext.moe_experts(x, gate_up_proj, down_proj, weights, ids)
    else:
        out = (_fast if _use_fast(x, gate_up_proj, down_proj, weights) else _ref_moe).moe_experts(
            x, gate_up_proj, down_proj, weights, ids)
    return out if gated is None else out + torch.sigmoid(gated[1]) * gated[0]


def moe_experts_shared_ok(x, gate_up_proj, top_k: int) -> bool:
    """The MoE block may take moe_experts_shared: CUDA, Triton, experts in the activation dtype, and
    decode / verify-sized batches (triton/moe.py SHARED_MAX_ROWS)."""
    return (_use_triton(x, gate_up_proj) and gate_up_proj.dtype == x.dtype
            and x.shape[0] * top_k <= _triton("moe").SHARED_MAX_ROWS)


def moe_experts_shared(x, gate_up_proj, down_proj, weights, ids, shared_gate_proj, shared_up_proj, shared_down_proj,
                       shared_expert_gate):
    """Routed experts + sigmoid(x shared_expert_gate^T) * shared_expert(x), the shared expert inside
    the experts' kernels (triton/moe.py); callers check moe_experts_shared_ok first."""
    return _triton("moe").moe_experts_shared(x, gate_up_proj, down_proj, weights, ids, shared_gate_proj,
                                             shared_up_proj, shared_down_proj, shared_expert_gate)


def fp8_linear(x, w8, scale, block=(128, 128)):
    """x [M, K] @ dequant(w8 [N, K] fp8, block scales)^T (layers/quant.py's Fp8Linear)."""
    if _use_triton(x) and block[1] % 128 == 0:
        return _triton("linear_fp8").fp8_linear(x, w8, scale, block)
    return _ref_fp8.fp8_linear(x, w8, scale, block)


def moe_experts_fp8(x, gate_up_proj, gate_up_scale, down_proj, down_scale, weights, ids, block=(128, 128),
                    shared=None, gated=None):
    """moe_experts over block-FP8 expert weights (kernels/fp8.py; Triton on CUDA); `shared` (fp8 gate /
    up / down + scales, bf16 gate vector) adds the MoE block's gated shared expert in the same kernels;
    `gated` = (sh [T, H], g [T, 1]), one computed outside, adds sigmoid(g) * sh (as moe_experts)."""
    if _use_triton(x, weights) and block[1] % 128 == 0 and down_proj.shape[-1] % block[0] == 0:
        return _triton("moe_fp8").moe_experts_fp8(x, gate_up_proj, gate_up_scale, down_proj, down_scale, weights,
                                                  ids, block, shared=shared, gated=gated)
    out = _ref_fp8.moe_experts_fp8(x, gate_up_proj, gate_up_scale, down_proj, down_scale, weights, ids, block,
                                   shared=shared)
    return out if gated is None else out + torch.sigmoid(gated[1]) * gated[0]
