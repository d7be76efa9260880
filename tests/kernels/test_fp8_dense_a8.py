"""w8a8 block-FP8 linear for prefill (triton/linear_fp8_a8.py) against kernels/fp8.py's fp8_linear_a8
(activations quantised per token and 128-channel group, fp32 products). CPU: the interpreter in fp32;
`gpu`: bf16 at the 80B model's shapes (QWEN3NEXT_AUTOTUNE=0: the first config)."""

from __future__ import annotations

import pytest
import torch

from qwen3next.kernels import fp8 as ref
from qwen3next.kernels.triton import linear_fp8 as tri_lin
from qwen3next.kernels.triton import linear_fp8_a8 as a8

from .conftest import DEV, randn, rel_err, seeded

# Hopper's fp8 MMA accumulates with fewer than fp32's bits inside one 128-wide k step
A8_TOL = 1e-5 if DEV == "cpu" else 1e-3


def _w(gen, N, K, dtype=torch.float32):
    return ref.quantize(randn(N, K, gen=gen, dtype=dtype, scale=K ** -0.5))


def test_quantize_act_matches_reference():
    x = randn(70, 300, gen=seeded(1))  # rows past one 32-row block, a partial group at the end
    x[5, 128:256] = 0
    q, s = a8.quantize_act(x)
    q_ref, s_ref = ref.quantize_act(x)
    assert s.shape == s_ref.shape and s.stride() == (1, 70)
    assert torch.equal(s, s_ref)
    assert torch.equal(q[5, 128:256].float(), torch.zeros(128))
    same = (q.float() == q_ref.float()).float().mean()
    # Triton's interpreter rounds to fp8 its own way near powers of two (test_fp8_kernels.py
    # test_quantize_act): exact only on GPUs
    assert same == 1 if DEV != "cpu" else same > 0.95


@pytest.mark.parametrize("M,N,K", [(65, 256, 384), (200, 384, 256), (500, 128, 512), (200, 64, 4096),
                                   (65, 200, 336)])
def test_gemm_a8(M, N, K):
    """The GEMM on the kernel's own quantised x (exact up to fp32 summation order): several row
    and column tiles, a weight narrower than one tile (N = 64), a long K; N and K off the 128 blocks
    (partial scale blocks, TMA's zero fill)."""
    gen = seeded(M + N + K)
    x = randn(M, K, gen=gen)
    w8, s = _w(gen, N, K)
    x8, xs = a8.quantize_act(x)
    y = a8.gemm_a8(x8, xs, w8, s, ref.BLOCK, x.dtype)
    assert y.shape == (M, N)
    assert rel_err(y, ref.fp8_linear_a8(x, w8, s, act=(x8, xs))) < A8_TOL
    # the whole path (the interpreter's fp8 rounding differs in a few activations: loose on CPU)
    assert rel_err(a8.fp8_linear_a8(x, w8, s, ref.BLOCK), ref.fp8_linear_a8(x, w8, s)) < (0.1 if DEV == "cpu" else A8_TOL)


@pytest.mark.parametrize("block", [(128, 128), (64, 128)])
def test_gemm_a8_every_config(block):
    """Each autotune config (tile shapes, the one-scale-per-tile and per-column weight scale forms),
    with several row / column tiles and bands; weight scale blocks narrower than the tile too."""
    gen = seeded(block[0])
    M, N, K = 130, 320, 384
    x = randn(M, K, gen=gen)
    w8, s = ref.quantize(randn(N, K, gen=gen, scale=K ** -0.5), block)
    x8, xs = a8.quantize_act(x)
    want = ref.fp8_linear_a8(x, w8, s, block, act=(x8, xs))
    for cfg in a8._CONFIGS + a8.WS_CONFIGS:
        assert rel_err(a8.gemm_a8(x8, xs, w8, s, block, x.dtype, config=cfg), want) < A8_TOL, cfg


def test_dispatch_flag(monkeypatch):
    """DENSE_A8 routes prefill rows (M > SMALL_M) through w8a8 (read per call); off, or at verify
    sizes, the w8a16 paths; blocks other than 128 along K fall back."""
    gen = seeded(7)
    x = randn(tri_lin.SMALL_M + 3, 256, gen=gen)
    w8, s = _w(gen, 128, 256)
    x8, xs = a8.quantize_act(x)
    want_a8 = ref.fp8_linear_a8(x, w8, s, act=(x8, xs))
    want_a16 = ref.fp8_linear(x, w8, s)
    assert rel_err(want_a8, want_a16) > 1e-3  # the two are distinguishable
    monkeypatch.setattr(tri_lin, "DENSE_A8", True)
    assert rel_err(tri_lin.fp8_linear(x, w8, s), want_a8) < A8_TOL
    for m in (8, tri_lin.SMALL_M):  # skinny and verify rows stay w8a16
        assert rel_err(tri_lin.fp8_linear(x[:m], w8, s), want_a16[:m]) < 1e-5, m
    w8b, sb = ref.quantize(randn(128, 256, gen=gen, scale=0.06), (128, 256))
    assert rel_err(tri_lin.fp8_linear(x, w8b, sb, (128, 256)), ref.fp8_linear(x, w8b, sb, (128, 256))) < 1e-5
    with pytest.raises(ValueError, match="weight_block_size"):
        tri_lin.fp8_linear(x, w8b, sb, (128, 256), path="a8")
    monkeypatch.setattr(tri_lin, "DENSE_A8", False)
    assert rel_err(tri_lin.fp8_linear(x, w8, s), want_a16) < 1e-5


@pytest.mark.gpu
def test_dense_a8_gpu():
    """The 80B projections' shapes at an 8K prefill: in_proj_qkvz (2048 -> 12288), out_proj / o_proj
    (4096 -> 2048), k/v (2048 -> 512), shared expert down (512 -> 2048), and a row count off the
    tiles; bf16 out vs the fp32 reference on the same quantised x, and within activation rounding of
    the w8a16 result."""
    gen = seeded(8192)
    for M, N, K in ((8192, 12288, 2048), (8192, 2048, 4096), (8192, 512, 2048), (8192, 2048, 512), (300, 2048, 4096)):
        x = randn(M, K, gen=gen, dtype=torch.bfloat16)
        w8, s = _w(gen, N, K, torch.bfloat16)
        y = tri_lin.fp8_linear(x, w8, s, path="a8")
        assert y.dtype == torch.bfloat16 and y.shape == (M, N)
        assert rel_err(y, ref.fp8_linear_a8(x, w8, s)) < 1e-2, (M, N, K)
        assert rel_err(y, ref.fp8_linear(x, w8, s)) < 0.04, (M, N, K)  # ~0.026: e4m3 rounding of x
        torch.cuda.synchronize()
