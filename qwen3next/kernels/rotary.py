"""Partial NeoX rotary embedding references (architecture.md §6.3-6.4), YaRN included.

`rope_inv_freq` builds the frequency table and attention factor from a `RopeConfig`;
`rope_cos_sin` turns positions into cos/sin rows [T, rotary_dim]; `apply_rotary` rotates the
first rotary_dim dims of each head with half-split pairs (i, i + rotary_dim/2).
"""

from __future__ import annotations

import math

import torch

from ..config import RopeConfig


def rope_inv_freq(rope: RopeConfig) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [rotary_dim/2] fp32, attention factor m). Matches transformers' fp32 maths."""
    d = rope.rotary_dim
    pos_freqs = rope.theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d)
    base_inv = 1.0 / pos_freqs
    if rope.rope_type == "default":
        return base_inv, 1.0
    f = rope.factor

    def get_mscale(scale: float, ms: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * ms * math.log(scale) + 1.0

    if rope.attention_factor is not None:
        m = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        m = get_mscale(f, rope.mscale) / get_mscale(f, rope.mscale_all_dim)
    else:
        m = get_mscale(f)
    l0 = rope.original_max_position_embeddings

    def corr(n_rot: float) -> float:
        return d * math.log(l0 / (n_rot * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = corr(rope.beta_fast), corr(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrap = 1 - ramp  # weight of the original (extrapolated) frequency
    inv = (base_inv / f) * (1 - extrap) + base_inv * extrap
    return inv, float(m)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float, dtype: torch.dtype):
    """positions [T] -> cos, sin [T, rotary_dim] in `dtype` (angles in fp32, as transformers)."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # [T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, d]
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, d] with d <= D: rotate x[..., :d], pass the rest through."""
    d = cos.shape[-1]
    x_rot, x_pass = x[..., :d], x[..., d:]
    x1, x2 = x_rot[..., : d // 2], x_rot[..., d // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = x_rot * cos[:, None, :] + rotated * sin[:, None, :]
    return torch.cat((out, x_pass), dim=-1)
