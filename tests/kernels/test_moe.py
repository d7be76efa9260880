"""Triton MoE routing and grouped expert GEMM against kernels/moe.py."""

from __future__ import annotations

import pytest
import torch

from qwen3next.kernels import moe as ref
from qwen3next.kernels.triton import moe as tri

from .conftest import randn, rel_err, seeded


@pytest.mark.parametrize("norm", [True, False])
def test_route(norm):
    logits = randn(37, 24, gen=seeded(1))
    w, ids = tri.moe_route(logits, 5, norm)
    w_ref, ids_ref = ref.moe_route(logits, 5, norm)
    assert torch.equal(ids, ids_ref)
    assert rel_err(w, w_ref) < 1e-6


@pytest.mark.parametrize("T,block_m,gemv", [(1, None, None), (63, 16, False), (65, 64, False), (21, None, True)])
def test_experts(T, block_m, gemv):
    """Grouped GEMM (block_m) and the per-assignment GEMV path (decode; experts picked by several
    tokens, sizes not multiples of the blocks)."""
    gen = seeded(T)
    E, H, I, k = 8, 40, 24, 3
    x = randn(T, H, gen=gen)
    gate_up, down = randn(E, 2 * I, H, gen=gen, scale=0.2), randn(E, H, I, gen=gen, scale=0.2)
    w, ids = ref.moe_route(randn(T, E, gen=gen), k, True)
    y = tri.moe_experts(x, gate_up, down, w, ids, block_m=block_m, gemv=gemv)
    assert rel_err(y, ref.moe_experts(x, gate_up, down, w, ids)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 4096])
def test_moe_bf16_gpu(T):
    gen = seeded(T)
    E, H, I, k = 512, 2048, 512, 10
    x = randn(T, H, gen=gen, dtype=torch.bfloat16)
    gate_up = randn(E, 2 * I, H, gen=gen, dtype=torch.bfloat16, scale=0.02)
    down = randn(E, H, I, gen=gen, dtype=torch.bfloat16, scale=0.02)
    logits = randn(T, E, gen=gen)  # fp32: bf16 logits tie often, and ties may pick either expert
    w, ids = tri.moe_route(logits, k, True)
    w_ref, ids_ref = ref.moe_route(logits, k, True)
    assert torch.equal(ids, ids_ref) and rel_err(w, w_ref) < 1e-5
    want = ref.moe_experts(x, gate_up, down, w_ref, ids_ref)
    for gemv in ((False, True) if T <= 64 else (False,)):
        y = tri.moe_experts(x, gate_up, down, w_ref, ids_ref, gemv=gemv)
        assert rel_err(y, want) < 1e-2, gemv
