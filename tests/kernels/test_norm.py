"""Triton RMSNorms against kernels/norm.py."""

from __future__ import annotations

import pytest
import torch

from qwen3next.kernels import norm as ref
from qwen3next.kernels.triton import norm as tri

from .conftest import randn, rel_err, seeded


@pytest.mark.parametrize("shape", [(1, 32), (7, 48), (3, 5, 64)])
def test_zc_rmsnorm(shape):
    gen = seeded(sum(shape))
    x, w = randn(*shape, gen=gen), randn(shape[-1], gen=gen, scale=0.1)
    assert rel_err(tri.zc_rmsnorm(x, w, 1e-6), ref.zc_rmsnorm(x, w, 1e-6)) < 1e-6


def test_zc_rmsnorm_strided_head_view():
    """The query half of a per-head [query | gate] projection, normalised in place of a copy;
    70 rows do not fill the last multi-row program."""
    gen = seeded(12)
    qg, w = randn(7, 10, 2 * 64, gen=gen), randn(64, gen=gen, scale=0.1)
    q = qg[..., :64]
    assert not q.is_contiguous()
    y = tri.zc_rmsnorm(q, w, 1e-6)
    assert y.shape == q.shape and y.is_contiguous()
    assert rel_err(y, ref.zc_rmsnorm(q, w, 1e-6)) < 1e-6


def test_zc_rmsnorm_fused_residual():
    gen = seeded(2)
    x, r, w = randn(9, 40, gen=gen), randn(9, 40, gen=gen), randn(40, gen=gen, scale=0.1)
    y, h = tri.zc_rmsnorm(x, w, 1e-6, residual=r)
    y_ref, h_ref = ref.zc_rmsnorm(x, w, 1e-6, residual=r)
    assert torch.equal(h, h_ref)
    assert rel_err(y, y_ref) < 1e-6


def test_gated_rmsnorm():
    gen = seeded(3)
    x, z, w = randn(67, 4, 32, gen=gen), randn(67, 4, 32, gen=gen), 1 + randn(32, gen=gen, scale=0.1)
    assert rel_err(tri.gated_rmsnorm(x, z, w, 1e-6), ref.gated_rmsnorm(x, z, w, 1e-6)) < 1e-6


def test_gated_rmsnorm_strided_views():
    """z a per-head slice of a wider projection ([T*Hk, r, dv] view, row stride past the heads), x a
    3-D view of another shape's rows: both read in place."""
    gen = seeded(5)
    T, Hk, r, dv = 5, 3, 2, 32
    proj, w = randn(T, Hk, 3 * r * dv, gen=gen), 1 + randn(dv, gen=gen, scale=0.1)
    z = proj[..., r * dv : 2 * r * dv].reshape(T * Hk, r, dv)  # a view: strides (3 r dv, dv, 1)
    assert not z.is_contiguous() and z.data_ptr() == proj[..., r * dv:].data_ptr()
    x = randn(T, Hk * r, dv, gen=gen).view(T * Hk, r, dv)
    y = tri.gated_rmsnorm(x, z, w, 1e-6)
    assert y.shape == x.shape and y.is_contiguous()
    assert rel_err(y, ref.gated_rmsnorm(x, z.contiguous(), w, 1e-6)) < 1e-6
    with pytest.raises(ValueError, match="z shape"):
        tri.gated_rmsnorm(x, z[:1], w, 1e-6)


@pytest.mark.gpu
def test_norms_bf16_gpu():
    gen = seeded(4)
    x, r = randn(4096, 2048, gen=gen, dtype=torch.bfloat16), randn(4096, 2048, gen=gen, dtype=torch.bfloat16)
    w = randn(2048, gen=gen, dtype=torch.bfloat16, scale=0.1)
    y, h = tri.zc_rmsnorm(x, w, 1e-6, residual=r)
    y_ref, h_ref = ref.zc_rmsnorm(x, w, 1e-6, residual=r)
    assert torch.equal(h, h_ref) and rel_err(y, y_ref) < 1e-2
    xo, z = randn(512, 32, 128, gen=gen, dtype=torch.bfloat16), randn(512, 32, 128, gen=gen, dtype=torch.bfloat16)
    wo = 1 + randn(128, gen=gen, dtype=torch.bfloat16, scale=0.1)
    assert rel_err(tri.gated_rmsnorm(xo, z, wo, 1e-6), ref.gated_rmsnorm(xo, z, wo, 1e-6)) < 1e-2
