"""The fused few-row MoE (triton/moe.py moe_experts_shared: routed experts + the gated shared
expert as one more GEMV assignment per token, or as expert E of the grouped GEMM) against the
reference composition, shared intermediate size equal to or unlike the experts'."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen3next.kernels import moe as ref
from qwen3next.kernels.triton import moe as tri

from .conftest import randn, rel_err, seeded


def _reference(x, gate_up, down, w, ids, sg, su, sd, sgw):
    """SparseMoeBlock's generic forward: routed + sigmoid(x sgw^T) * down(silu(x sg^T) * (x su^T))."""
    shared = F.linear(F.silu(F.linear(x, sg)) * F.linear(x, su), sd)
    return ref.moe_experts(x, gate_up, down, w, ids) + torch.sigmoid(F.linear(x, sgw)) * shared


def _weights(E, H, I, Is, gen, dtype=torch.float32, scale=0.2):
    return (randn(E, 2 * I, H, gen=gen, scale=scale, dtype=dtype), randn(E, H, I, gen=gen, scale=scale, dtype=dtype),
            randn(Is, H, gen=gen, scale=scale, dtype=dtype), randn(Is, H, gen=gen, scale=scale, dtype=dtype),
            randn(H, Is, gen=gen, scale=scale, dtype=dtype), randn(1, H, gen=gen, scale=scale, dtype=dtype))


@pytest.mark.parametrize("T,Is,block_m", [(1, 24, None), (3, 40, None), (5, 16, None), (1, 24, 16), (9, 40, 16),
                                          (21, 16, 64), (70, 24, 16)])
def test_experts_shared(T, Is, block_m):
    gen = seeded(100 + T)
    E, H, I, k = 8, 40, 24, 3
    x = randn(T, H, gen=gen)
    gate_up, down, sg, su, sd, sgw = _weights(E, H, I, Is, gen)
    w, ids = ref.moe_route(randn(T, E, gen=gen), k, True)
    y = tri.moe_experts_shared(x, gate_up, down, w, ids, sg, su, sd, sgw, block_m=block_m)
    assert rel_err(y, _reference(x, gate_up, down, w, ids, sg, su, sd, sgw)) < 1e-5


def test_gemv_k_tiles(monkeypatch):
    """The GEMV kernels over several K tiles, the last one partial (the default configs' tiles are
    wider than the test's rows)."""
    import triton

    cfg = [triton.Config({"BN": 8, "BK": 16}, num_warps=4)]
    for kern in (tri._gemv_gate_up_kernel, tri._gemv_down_kernel):
        monkeypatch.setattr(kern, "configs", cfg)
        monkeypatch.setattr(kern, "cache", {})
    gen = seeded(40)
    E, H, I, Is, k, T = 6, 40, 24, 20, 2, 3
    x = randn(T, H, gen=gen)
    gate_up, down, sg, su, sd, sgw = _weights(E, H, I, Is, gen)
    w, ids = ref.moe_route(randn(T, E, gen=gen), k, True)
    y = tri.moe_experts_shared(x, gate_up, down, w, ids, sg, su, sd, sgw, gemv=True)
    assert rel_err(y, _reference(x, gate_up, down, w, ids, sg, su, sd, sgw)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64])  # GEMV path, grouped GEMM (every new shape autotunes: compiles)
def test_experts_shared_bf16_gpu(T):
    gen = seeded(T)
    E, H, I, k = 512, 2048, 512, 10
    x = randn(T, H, gen=gen, dtype=torch.bfloat16)
    ws = _weights(E, H, I, I, gen, dtype=torch.bfloat16, scale=0.02)
    w, ids = ref.moe_route(randn(T, E, gen=gen), k, True)
    want = _reference(x, ws[0], ws[1], w, ids, *ws[2:])
    for gemv in ((True, False) if T == 1 else (False,)):
        y = tri.moe_experts_shared(x, ws[0], ws[1], w, ids, *ws[2:], gemv=gemv)
        assert rel_err(y, want) < 1e-2, gemv
