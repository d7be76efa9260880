"""Triton block-FP8 kernels (linear, MoE experts) against kernels/fp8.py's references (dequantise,
then the plain computation). CPU: the interpreter in fp32 at small shapes; `gpu`: bf16 at the 80B
model's shapes."""

from __future__ import annotations

import pytest
import torch

from qwen3next.kernels import fp8 as ref
from qwen3next.kernels import moe as ref_moe
from qwen3next.kernels.triton import linear_fp8 as tri_lin
from qwen3next.kernels.triton import moe_fp8 as tri_moe

from .conftest import DEV, randn, rel_err, seeded


def _q(w: torch.Tensor):
    return ref.quantize(w)


@pytest.mark.parametrize("M,N,K,small", [(3, 200, 320, True), (37, 200, 320, True), (150, 200, 320, False),
                                         (2, 40, 1100, True)])
def test_linear(M, N, K, small):
    """N and K not multiples of the 128 blocks (partial scale blocks); both paths; a narrow weight
    whose K is split over programs (fp32 partials summed)."""
    gen = seeded(M)
    x = randn(M, K, gen=gen)
    w8, s = _q(randn(N, K, gen=gen, scale=0.1))
    y = tri_lin.fp8_linear(x, w8, s, small=small)
    assert y.shape == (M, N)
    assert rel_err(y, ref.fp8_linear(x, w8, s)) < 1e-5


@pytest.mark.parametrize("T,block_m,gemv,a8", [(1, None, None, False), (5, None, True, False),
                                               (23, 16, False, False), (23, 16, False, True)])
def test_experts(T, block_m, gemv, a8):
    """GEMV and grouped GEMM (w8a16, w8a8) over fp8 experts; experts picked by several tokens."""
    gen = seeded(T + 100)
    E, H, I, k = 6, 256, 256, 3
    x = randn(T, H, gen=gen)
    gu8, gus = _q(randn(E, 2 * I, H, gen=gen, scale=0.1))
    dn8, dns = _q(randn(E, H, I, gen=gen, scale=0.1))
    w, ids = ref_moe.moe_route(randn(T, E, gen=gen), k, True)
    y = tri_moe.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, act_quant=a8, block_m=block_m, gemv=gemv)
    want = ref.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, act_quant=a8)
    # the interpreter rounds to fp8 its own way (see test_quantize_act), so the in-kernel activation
    # quantisation only matches loosely here; test_experts_gpu holds it to 1e-2
    assert rel_err(y, want) < (0.2 if a8 and DEV == "cpu" else 1e-5)


def test_quantize_act():
    x = randn(7, 300, gen=seeded(3))  # a partial group at the end
    x[2, :128] = 0
    q, s = tri_moe.quantize_act(x)
    q_ref, s_ref = ref.quantize_act(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q[2, :128].float(), torch.zeros(128))
    same = (q.float() == q_ref.float()).float().mean()
    # Triton 3.9's interpreter rounds x.yyy just under a power of two down to half of it (no carry
    # into the exponent) and flushes subnormals: exact only on GPUs
    assert same == 1 if DEV != "cpu" else same > 0.95


def test_experts_rejects_unaligned_intermediate():
    x = torch.zeros(1, 128, device=DEV)
    gu8 = torch.zeros(2, 2 * 64, 128, device=DEV).to(ref.FP8)
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        tri_moe.moe_experts_fp8(x, gu8, None, gu8[:, :, :64], None, torch.ones(1, 1, device=DEV),
                                torch.zeros(1, 1, dtype=torch.long, device=DEV))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64, 4096])
def test_linear_gpu(M):
    gen = seeded(M)
    for N, K in ((12288, 2048), (2048, 4096), (512, 2048)):
        x = randn(M, K, gen=gen, dtype=torch.bfloat16)
        w8, s = _q(randn(N, K, gen=gen, dtype=torch.bfloat16, scale=K ** -0.5))
        y = tri_lin.fp8_linear(x, w8, s)
        assert rel_err(y, ref.fp8_linear(x, w8, s)) < 1e-2, (N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 4096])
def test_experts_gpu(T):
    gen = seeded(T)
    E, H, I, k = 512, 2048, 512, 10
    x = randn(T, H, gen=gen, dtype=torch.bfloat16)
    gu8, gus = _q(randn(E, 2 * I, H, gen=gen, dtype=torch.bfloat16, scale=0.02))
    dn8, dns = _q(randn(E, H, I, gen=gen, dtype=torch.bfloat16, scale=0.02))
    w, ids = ref_moe.moe_route(randn(T, E, gen=gen), k, True)
    want = ref.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids)
    for gemv in ((False, True) if T <= 64 else (False,)):
        y = tri_moe.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, act_quant=False, gemv=gemv)
        assert rel_err(y, want) < 1e-2, gemv
    y = tri_moe.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, gemv=False)  # w8a8
    assert rel_err(y, ref.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, act_quant=True)) < 1e-2
    assert rel_err(y, want) < 0.08
