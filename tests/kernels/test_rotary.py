"""Triton partial rotary embedding against kernels/rotary.py (strided head views included)."""

from __future__ import annotations

import pytest
import torch

from qwen3next.kernels import norm as norm_ref
from qwen3next.kernels import rotary as ref
from qwen3next.kernels.triton import rotary as tri

from .conftest import DEV, randn, rel_err, seeded


@pytest.mark.parametrize("T,NH,D,d", [(1, 3, 64, 16), (37, 5, 48, 48), (9, 4, 32, 8)])
def test_apply_rotary(T, NH, D, d):
    gen = seeded(T + D)
    xg = randn(T, NH, 2 * D, gen=gen)
    x = xg[..., :D]  # a strided view, as q's half of [query | gate]
    ang = randn(T, d // 2, gen=gen)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    y = tri.apply_rotary(x, cos, sin)
    assert rel_err(y, ref.apply_rotary(x, cos, sin)) < 1e-6
    assert torch.equal(y[..., d:], x[..., d:])


@pytest.mark.gpu
def test_apply_rotary_bf16_gpu_matches_torch_rounding():
    gen = seeded(1)
    x = randn(4096, 16, 256, gen=gen, dtype=torch.bfloat16)
    pos = torch.arange(4096, device=DEV).float()
    inv = 1.0 / (1e7 ** (torch.arange(0, 64, 2, device=DEV).float() / 64))
    emb = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    assert rel_err(tri.apply_rotary(x, cos, sin), ref.apply_rotary(x, cos, sin)) < 1e-3


@pytest.mark.parametrize("T,NH,D,d", [(1, 3, 64, 16), (37, 5, 48, 48)])
def test_norm_rotary_matches_norm_then_rotary(T, NH, D, d):
    gen = seeded(T + 7)
    x = randn(T, NH, 2 * D, gen=gen)[..., :D]  # strided, as q's half of [query | gate]
    w = randn(D, gen=gen, scale=0.3)
    ang = randn(T, d // 2, gen=gen)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    want = ref.apply_rotary(norm_ref.zc_rmsnorm(x, w, 1e-6), cos, sin)
    assert rel_err(tri.norm_rotary(x, w, 1e-6, cos, sin), want) < 1e-6


@pytest.mark.gpu
def test_norm_rotary_bf16_gpu():
    gen = seeded(2)
    x = randn(4096, 16, 512, gen=gen, dtype=torch.bfloat16)[..., :256]
    w = randn(256, gen=gen, dtype=torch.bfloat16, scale=0.3)
    ang = randn(4096, 32, gen=gen)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).bfloat16(), torch.cat([ang.sin(), ang.sin()], -1).bfloat16()
    want = ref.apply_rotary(norm_ref.zc_rmsnorm(x, w, 1e-6), cos, sin)
    assert rel_err(tri.norm_rotary(x, w, 1e-6, cos, sin), want) < 5e-3
