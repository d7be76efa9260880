"""The DeltaNet's gated RMSNorm fused into the chunked delta rule's output kernel (delta_rule.py
`norm=`, gdn_prep.NORM_FUSED) against the two-step path (delta rule, then norm.gated_rmsnorm):
the same bits, outputs and carried states, in the interpreter (float32) and on the GPU (bf16, 8K
tokens through the layer)."""

from __future__ import annotations

import pytest
import torch

from qwen3next.kernels.triton import delta_rule as dr
from qwen3next.kernels.triton import gdn_prep
from qwen3next.kernels.triton import norm as tri_norm

from .conftest import DEV, cu, randn, seeded

HK, HV, DK, DV = 2, 4, 16, 32


def _inputs(T: int, seed: int, N: int = 4, dtype=torch.float32):
    """Delta-rule inputs, a state pool, and the gate z as the layer's [T * Hk, r, dv] view of a wider
    projection (row stride past the key head's other columns: read in place)."""
    gen = seeded(seed)
    q = torch.nn.functional.normalize(randn(T, HK, DK, gen=gen), dim=-1).to(dtype) * DK ** -0.5
    k = torch.nn.functional.normalize(randn(T, HK, DK, gen=gen), dim=-1).to(dtype)
    v = randn(T, HV, DV, gen=gen, dtype=dtype)
    g = -torch.rand(T, HV, generator=gen).to(DEV) * 0.5
    beta = torch.rand(T, HV, generator=gen).to(DEV)
    r = HV // HK
    proj = randn(T, HK, 3 * r * DV, gen=gen, dtype=dtype)
    z = proj[..., r * DV : 2 * r * DV].view(T * HK, r, DV)
    w = 1 + randn(DV, gen=gen, scale=0.1)
    state = randn(N, HV, DK, DV, gen=gen, scale=0.1)
    return (q, k, v, g, beta), z, w, state


def _both(args, z, w, state, lens, slots, init):
    """(fused o, fused state), (two-step o, two-step state) of one varlen batch."""
    st_f, st_u = state.clone(), state.clone()
    c = cu(lens)
    fused = dr.gated_delta_rule_chunked(*args, c, st_f, slots, init, norm=(z, w, 1e-6))
    o = dr.gated_delta_rule_chunked(*args, c, st_u, slots, init)
    two = tri_norm.gated_rmsnorm(o.view(z.shape), z, w, 1e-6).view(o.shape)
    return (fused, st_f), (two, st_u)


@pytest.mark.parametrize("T", [1, 63, 64, 65, pytest.param(500, marks=pytest.mark.slow)])
def test_fused_norm_equals_two_steps(T):
    args, z, w, state = _inputs(T, seed=T)
    slots, init = torch.tensor([2], device=DEV), torch.tensor([True], device=DEV)
    (o_f, s_f), (o_u, s_u) = _both(args, z, w, state, [T], slots, init)
    assert o_f.shape == (T, HV, DV) and torch.isfinite(o_f).all()
    assert torch.equal(o_f, o_u)
    assert torch.equal(s_f, s_u)
    assert not torch.equal(o_f, dr.gated_delta_rule_chunked(*args, cu([T]), state.clone(), slots, init))


def test_fused_norm_varlen_states_carried():
    """Two varlen batches, the second continuing the first's states (fresh and continued rows,
    lengths around the 64-token chunk)."""
    lens = [[63, 1, 65, 5], [64, 2, 130, 1]]
    args, z, w, state = _inputs(sum(lens[0]) + sum(lens[1]), seed=7)
    slots = torch.tensor([3, 0, 2, 1], device=DEV)
    inits = [torch.tensor([False, True, False, True], device=DEV), torch.ones(4, dtype=torch.bool, device=DEV)]
    s_f = s_u = state
    n0 = 0
    r = HV // HK
    for ln, init in zip(lens, inits):
        n = sum(ln)
        part = tuple(x[n0:n0 + n] for x in args)
        zp = z[n0 * HK:(n0 + n) * HK]
        (o_f, s_f), (o_u, s_u2) = _both(part, zp, w, s_f, ln, slots, init)
        assert torch.equal(o_f, o_u)
        assert torch.equal(s_f, s_u2) and zp.shape == (n * HK, r, DV)
        n0 += n


def test_fused_norm_fallbacks_and_errors():
    """fuse_output (the state kernel's narrow tiles) applies the norm after: still the same bits; a z
    view whose row grouping does not divide Hv is copied; a z without T * Hv rows of dv is refused."""
    T = 70
    args, z, w, state = _inputs(T, seed=11)
    slots, init = torch.tensor([0], device=DEV), torch.tensor([True], device=DEV)
    (o_f, _), _ = _both(args, z, w, state, [T], slots, init)
    o_out = dr.gated_delta_rule_chunked(*args, cu([T]), state.clone(), slots, init, norm=(z, w, 1e-6),
                                        fuse_output=True)
    o_two = dr.gated_delta_rule_chunked(*args, cu([T]), state.clone(), slots, init, fuse_output=True)
    assert torch.equal(o_out, tri_norm.gated_rmsnorm(o_two.view(z.shape), z, w, 1e-6).view(o_two.shape))
    # z rows grouped 5 to a row of its view (5 does not divide Hv = 4): read as a contiguous copy
    z5 = z.reshape(T * HV // 5, 5, DV)
    (o_5, _), (o_5u, _) = _both(args, z5, w, state, [T], slots, init)
    assert torch.equal(o_5, o_5u) and torch.equal(o_5, o_f)
    with pytest.raises(ValueError, match="norm: z shape"):
        dr.gated_delta_rule_chunked(*args, cu([T]), state.clone(), slots, init, norm=(z[:-2], w, 1e-6))


@pytest.mark.parametrize("verify", [False, True])
def test_gdn_cached_norm_switch(verify, monkeypatch):
    """gdn_prep.gdn_cached(norm=...) with NORM_FUSED on and off (and the verify path, which always
    norms after): the same outputs and states."""
    gen = seeded(5)
    T, K, N = 67, 4, 3
    C = 2 * HK * DK + HV * DV
    ba = randn(T, 2 * HV, gen=gen)
    base = dict(m=randn(T, C, gen=gen), b=ba[:, :HV], a=ba[:, HV:], conv_weight=randn(C, K, gen=gen, scale=0.5),
                conv_state=randn(N, C, K - 1, gen=gen), recurrent_state=randn(N, HV, DK, DV, gen=gen, scale=0.1),
                A_log=randn(HV, gen=gen, scale=0.5), dt_bias=randn(HV, gen=gen), num_k_heads=HK)
    r = HV // HK
    z = randn(T, HK, 3 * r * DV, gen=gen)[..., :r * DV].view(T * HK, r, DV)
    w = 1 + randn(DV, gen=gen, scale=0.1)
    lens = [60, 7] if not verify else [4] * 16 + [3]
    pts = torch.arange(T, device=DEV) % N if verify else None
    outs = []
    for on in (True, False):
        monkeypatch.setattr(gdn_prep, "NORM_FUSED", on)
        a = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in base.items()}
        nseq = len(lens)
        o = gdn_prep.gdn_cached(**a, cu_seqlens=cu(lens), state_slots=torch.arange(nseq, device=DEV) % N,
                                has_initial_state=torch.ones(nseq, dtype=torch.bool, device=DEV),
                                per_token_state_slots=pts, norm=(z, w, 1e-6))
        outs.append((o, a["recurrent_state"], a["conv_state"]))
    assert torch.isfinite(outs[0][0]).all()
    for x, y in zip(*outs):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_layer_fused_norm_bf16_8k_gpu(monkeypatch):
    """The 80B DeltaNet layer (bf16) over an 8K prefill continuing a state, then a varlen batch:
    NORM_FUSED on and off give the same bits (output, recurrent and conv states)."""
    from qwen3next.config import ModelConfig
    from qwen3next.forward_batch import ForwardBatch, ModelCache
    from qwen3next.layers.gated_deltanet import GatedDeltaNet

    cfg = ModelConfig.from_hf(dict(model_type="qwen3_next", vocab_size=256, hidden_size=2048, intermediate_size=512,
                                   num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                                   linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                                   linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=4,
                                   num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                                   layer_types=["linear_attention"]))
    torch.manual_seed(0)
    layer = GatedDeltaNet(cfg, 0).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.5)
        layer.norm.weight.normal_(1.0, 0.1)
        layer.A_log.uniform_(-1, 1)
    C = layer.conv_dim
    for lens, ctx in (([8192], [100]), ([3000, 64, 1, 5127], [0, 7, 0, 1])):
        T = sum(lens)
        x = torch.randn(T, 2048, device="cuda", dtype=torch.bfloat16)
        results = []
        for on in (True, False):
            monkeypatch.setattr(gdn_prep, "NORM_FUSED", on)
            torch.manual_seed(1)
            cache = ModelCache(conv={0: torch.randn(4, C, 3, device="cuda", dtype=torch.bfloat16)},
                               recurrent={0: 0.1 * torch.randn(4, 32, 128, 128, device="cuda")})
            fb = ForwardBatch(cu_seqlens=cu(lens, "cuda"), seq_lens=lens, context_lens=ctx, cache=cache,
                              state_slots=torch.arange(len(lens), device="cuda"))
            with torch.inference_mode():
                results.append((layer(x, fb), cache.recurrent[0], cache.conv[0]))
        (y1, r1, c1), (y2, r2, c2) = results
        assert torch.isfinite(y1.float()).all()
        assert torch.equal(y1, y2), f"{lens}: {(y1 != y2).sum().item()} elements differ"
        assert torch.equal(r1, r2) and torch.equal(c1, c2)
