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


@pytest.mark.parametrize("M,N,K,path", [(3, 200, 320, "w8a16"), (37, 200, 320, "w8a16"), (150, 200, 320, "dequant"),
                                        (2, 40, 1100, "w8a16"), (1, 200, 320, "gemv"), (3, 40, 1100, "gemv"),
                                        (4, 72, 640, None), (9, 200, 320, "skinny"), (37, 100, 1100, "skinny"),
                                        (64, 130, 2304, None)])
def test_linear(M, N, K, path):
    """N and K not multiples of the 128 blocks (partial scale blocks); every path (None: the
    default for M); narrow weights whose K is split over programs (fp32 partials summed)."""
    gen = seeded(M + K)
    x = randn(M, K, gen=gen)
    w8, s = _q(randn(N, K, gen=gen, scale=0.1))
    y = tri_lin.fp8_linear(x, w8, s, path=path)
    assert y.shape == (M, N)
    assert rel_err(y, ref.fp8_linear(x, w8, s)) < 1e-5


def _experts(gen, E, H, I, scale=0.1, dtype=torch.float32):
    gu8, gus = _q(randn(E, 2 * I, H, gen=gen, dtype=dtype, scale=scale))
    dn8, dns = _q(randn(E, H, I, gen=gen, dtype=dtype, scale=scale))
    return gu8, gus, dn8, dns


def _shared(gen, H, IS, scale=0.1, dtype=torch.float32):
    """(gate_proj, scale, up_proj, scale, down_proj, scale, shared_expert_gate) of a gated shared expert."""
    g8, gs = _q(randn(IS, H, gen=gen, dtype=dtype, scale=scale))
    u8, us = _q(randn(IS, H, gen=gen, dtype=dtype, scale=scale))
    d8, ds = _q(randn(H, IS, gen=gen, dtype=dtype, scale=scale))
    return g8, gs, u8, us, d8, ds, randn(1, H, gen=gen, dtype=dtype, scale=0.1)


@pytest.mark.parametrize("T,block_m,gemv,a8,IS", [(1, None, None, False, None), (5, None, True, False, None),
                                                  (23, 16, False, False, None), (23, 16, False, True, None),
                                                  (2, None, True, False, 384), (3, None, True, False, 128),
                                                  (21, 16, False, False, 384), (21, 16, False, True, 128)])
def test_experts(T, block_m, gemv, a8, IS):
    """GEMV and grouped GEMM (w8a16, w8a8) over fp8 experts; experts picked by several tokens; with
    a gated fp8 shared expert (IS: its intermediate size, wider or narrower than the experts')."""
    gen = seeded(T + 100)
    E, H, I, k = 6, 384, 256, 3  # H: three 128-wide scale blocks (a partial BK = 256 step)
    x = randn(T, H, gen=gen)
    gu8, gus, dn8, dns = _experts(gen, E, H, I)
    sh = None if IS is None else _shared(gen, H, IS)
    w, ids = ref_moe.moe_route(randn(T, E, gen=gen), k, True)
    y = tri_moe.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, act_quant=a8, block_m=block_m, gemv=gemv, shared=sh)
    want = ref.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, act_quant=a8, shared=sh)
    # the interpreter rounds to fp8 its own way (see test_quantize_act), so the in-kernel activation
    # quantisation only matches loosely here; test_experts_gpu holds it to 1e-2
    assert rel_err(y, want) < (0.2 if a8 and DEV == "cpu" else 1e-5)
    if sh is not None:  # the shared expert is really in there
        assert rel_err(y, ref.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, act_quant=a8)) > 0.05


def test_experts_rejects_unaligned_shared():
    gen = seeded(5)
    x = randn(1, 256, gen=gen)
    gu8, gus, dn8, dns = _experts(gen, 2, 256, 128)
    w, ids = ref_moe.moe_route(randn(1, 2, gen=gen), 1, True)
    with pytest.raises(ValueError, match="shared_expert_intermediate_size"):
        tri_moe.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, shared=_shared(gen, 256, 192))


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
@pytest.mark.parametrize("M", [1, 3, 16, 64, 100, 4096])
def test_linear_gpu(M):
    gen = seeded(M)
    for N, K in ((12288, 2048), (2048, 4096), (512, 2048)):
        x = randn(M, K, gen=gen, dtype=torch.bfloat16)
        w8, s = _q(randn(N, K, gen=gen, dtype=torch.bfloat16, scale=K ** -0.5))
        want = ref.fp8_linear(x, w8, s)
        assert rel_err(tri_lin.fp8_linear(x, w8, s), want) < 1e-2, (N, K)  # the default path for M
        if M <= 64:  # the 16-row GEMM (the form before the GEMV / skinny kernels), still reachable
            assert rel_err(tri_lin.fp8_linear(x, w8, s, path="w8a16"), want) < 1e-2, (N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16, 64, 4096])
def test_experts_gpu(T):
    gen = seeded(T)
    E, H, I, k = 512, 2048, 512, 10
    x = randn(T, H, gen=gen, dtype=torch.bfloat16)
    gu8, gus, dn8, dns = _experts(gen, E, H, I, scale=0.02, dtype=torch.bfloat16)
    sh = _shared(gen, H, 512, scale=0.02, dtype=torch.bfloat16)
    w, ids = ref_moe.moe_route(randn(T, E, gen=gen), k, True)
    want = ref.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids)
    want_sh = ref.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, shared=sh)
    for gemv in ((False, True) if T <= 8 else (False,)):
        y = tri_moe.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, act_quant=False, gemv=gemv)
        assert rel_err(y, want) < 1e-2, gemv
        y = tri_moe.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, act_quant=False, gemv=gemv, shared=sh)
        assert rel_err(y, want_sh) < 1e-2, ("shared", gemv)
    y = tri_moe.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, gemv=False)  # w8a8
    assert rel_err(y, ref.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, act_quant=True)) < 1e-2
    assert rel_err(y, want) < 0.08
    if T <= 64:  # the decode sizes the MoE block fuses (w8a8 grouped with the shared expert)
        y = tri_moe.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, gemv=False, shared=sh)
        assert rel_err(y, ref.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, act_quant=True, shared=sh)) < 1e-2


def test_moe_block_fused_fp8_shared(monkeypatch):
    """SparseMoeBlock with fp8 experts and an fp8 shared expert takes the one-call path (fused
    kernels on CUDA, the reference here) and returns what its modules compute one by one."""
    monkeypatch.setenv("QWEN3NEXT_KERNELS", "torch")  # the CPU fusions read bf16 weights
    from qwen3next.config import ModelConfig
    from qwen3next.layers import quant
    from qwen3next.layers.moe import SparseMoeBlock

    cfg = ModelConfig.from_hf({"model_type": "qwen3_next", "hidden_size": 256, "num_experts": 4,
                               "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                               "shared_expert_intermediate_size": 128, "num_hidden_layers": 1})
    torch.manual_seed(0)
    moe = SparseMoeBlock(cfg).to(DEV)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.05)
    assert len(quant.to_fp8_(moe, (128, 128), ["experts", "shared_expert.gate_proj", "shared_expert.up_proj",
                                                "shared_expert.down_proj"])) == 4
    x = randn(5, 256, gen=seeded(9))
    assert quant.fused_fp8_shared(moe, x) is not None
    with torch.no_grad():
        y, logits = moe(x)
        w, ids = ref_moe.moe_route(logits, 2, cfg.norm_topk_prob)
        want = moe.experts(x, w, ids) + torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)
    assert rel_err(y, want) < 1e-5
    assert quant.fused_fp8_shared(moe, randn(quant.FUSED_SHARED_MAX_ROWS, 256, gen=seeded(1))) is None
