"""Triton gated delta rule (chunked prefill, recurrent/decode) against kernels/delta_rule.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen3next.kernels import delta_rule as ref
from qwen3next.kernels.triton import delta_rule as tri

from .conftest import DEV, cu, randn, rel_err, seeded


def make(lens, hk, hv, dk, dv, seed, dtype=torch.float32):
    gen = seeded(seed)
    T = sum(lens)
    q = F.normalize(randn(T, hk, dk, gen=gen), dim=-1) * dk**-0.5
    k = F.normalize(randn(T, hk, dk, gen=gen), dim=-1)
    v = randn(T, hv, dv, gen=gen)
    g = -F.softplus(randn(T, hv, gen=gen) - 2.0)  # log-decay <= 0
    beta = torch.sigmoid(randn(T, hv, gen=gen))
    return q.to(dtype), k.to(dtype), v.to(dtype), g, beta


# kernel pipelines (see gated_delta_rule_chunked): the default, session 4's, the fused output
VARIANTS = [dict(), dict(fuse_wu=False, bk_out=128), dict(fuse_output=True)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("lens", [[1], [63], [64], [65], [500], [1, 63, 64, 65, 20]])
def test_chunked_matches_reference_fresh(lens, variant):
    q, k, v, g, beta = make(lens, 2, 4, 16, 32, seed=len(lens) * 1000 + sum(lens))
    c = cu(lens)
    o = tri.gated_delta_rule_chunked(q, k, v, g, beta, c, **variant)
    o_ref = ref.gated_delta_rule_recurrent(q, k, v, g, beta, c)
    assert rel_err(o, o_ref) < 1e-4


@pytest.mark.parametrize("variant", VARIANTS + [dict(warps_kkt=2)])
def test_chunked_state_pool_carried_across_calls(variant):
    """Two calls over a varlen batch through the state pool == one call over the whole sequences
    (state kernel variants: output fused or not; other launch settings)."""
    first, second = [70, 1, 64, 5], [30, 64, 2, 100]
    whole = [a + b for a, b in zip(first, second)]
    hk, hv, dk, dv = 1, 2, 32, 16
    q, k, v, g, beta = make(whole, hk, hv, dk, dv, seed=7)
    o_whole = ref.gated_delta_rule_recurrent(q, k, v, g, beta, cu(whole))
    # split every sequence into its first and second part, packed in two batches
    starts = cu(whole).tolist()
    idx1 = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, first)]).to(DEV)
    idx2 = torch.cat([torch.arange(s + n1, s + n1 + n2) for s, n1, n2 in zip(starts, first, second)]).to(DEV)
    slots = torch.tensor([5, 0, 3, 1], device=DEV)
    pool = randn(6, hv, dk, dv, gen=seeded(3))  # garbage: has_initial_state=False must ignore it
    untouched = pool[[2, 4]].clone()
    parts = []
    for idx, lens, init in ((idx1, first, False), (idx2, second, True)):
        has = torch.full((4,), init, dtype=torch.bool, device=DEV)
        parts.append(tri.gated_delta_rule_chunked(q[idx], k[idx], v[idx], g[idx], beta[idx], cu(lens),
                                                  pool, slots, has, **variant))
    assert rel_err(parts[0], o_whole[idx1]) < 1e-4
    assert rel_err(parts[1], o_whole[idx2]) < 1e-4
    ref_pool = torch.zeros(6, hv, dk, dv, device=DEV)
    ref.gated_delta_rule_recurrent(q, k, v, g, beta, cu(whole), ref_pool, slots)
    assert rel_err(pool[slots], ref_pool[slots]) < 1e-4
    assert torch.equal(pool[[2, 4]], untouched)


def test_chunked_refuses_narrow_fused_output_tiles():
    q, k, v, g, beta = make([70], 1, 2, 16, 64, seed=2)
    with pytest.raises(ValueError, match="bv_state"):
        tri.gated_delta_rule_chunked(q, k, v, g, beta, cu([70]), fuse_output=True, bv_state=16)


def test_chunked_with_empty_sequences_in_the_batch():
    lens = [0, 70, 0, 5]
    q, k, v, g, beta = make(lens, 1, 2, 16, 16, seed=13)
    slots = torch.tensor([0, 1, 2, 3], device=DEV)
    pool = randn(4, 2, 16, 16, gen=seeded(14), scale=0.1)
    p_t, p_r = pool.clone(), pool.clone()
    o = tri.gated_delta_rule_chunked(q, k, v, g, beta, cu(lens), p_t, slots)
    o_ref = ref.gated_delta_rule_recurrent(q, k, v, g, beta, cu(lens), p_r, slots)
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(p_t, p_r) < 1e-5


def test_recurrent_matches_reference_with_per_token_states():
    lens = [3, 1, 5]
    hk, hv, dk, dv = 2, 4, 16, 16
    q, k, v, g, beta = make(lens, hk, hv, dk, dv, seed=11)
    slots = torch.tensor([0, 1, 2], device=DEV)
    pts = torch.tensor([3, -1, 4, 5, 6, -1, 7, -1, 8], device=DEV)
    init = randn(9, hv, dk, dv, gen=seeded(12), scale=0.1)
    pool_t, pool_r = init.clone(), init.clone()
    has = torch.tensor([True, False, True], device=DEV)
    o = tri.gated_delta_rule_recurrent(q, k, v, g, beta, cu(lens), pool_t, slots, has, per_token_state_slots=pts)
    o_ref = ref.gated_delta_rule_recurrent(q, k, v, g, beta, cu(lens), pool_r, slots, has, per_token_state_slots=pts)
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(pool_t, pool_r) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS + [dict(fuse_wu=True, bk_out=64, warps_out=8, warps_state=8, warps_kkt=2),
                                     dict(fuse_wu=True, bk_out=32, warps_out=8), dict(fuse_wu=True, bk_out=32),
                                     dict(bv_state=64)])
@pytest.mark.parametrize("lens", [[4096], [1, 700, 64, 3000, 65]])
def test_chunked_bf16_gpu(lens, variant):
    hk, hv, dk, dv = 16, 32, 128, 128
    q, k, v, g, beta = make(lens, hk, hv, dk, dv, seed=5, dtype=torch.bfloat16)
    c = cu(lens)
    pool = torch.randn(len(lens) + 2, hv, dk, dv, device=DEV) * 0.05
    slots = torch.arange(len(lens), device=DEV) + 1
    has = torch.ones(len(lens), dtype=torch.bool, device=DEV)
    pool_ref = pool.clone()
    o = tri.gated_delta_rule_chunked(q, k, v, g, beta, c, pool, slots, has, **variant)
    o_ref = ref.gated_delta_rule_chunked(q.float(), k.float(), v.float(), g, beta, c, pool_ref, slots, has)
    assert rel_err(o, o_ref) < 2e-2
    assert rel_err(pool, pool_ref) < 2e-2


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_bf16_state_pool(form):
    """A bf16 state pool (vLLM's --mamba-ssm-cache-dtype): read as bf16, computed in fp32, the
    final state rounded on store; matches the reference run on the same bf16 pool."""
    lens = [70, 5, 130]
    q, k, v, g, beta = make(lens, 1, 2, 16, 32, seed=21)
    slots = torch.tensor([3, 0, 1], device=DEV)
    pool = randn(5, 2, 16, 32, gen=seeded(22), scale=0.1).to(torch.bfloat16)
    has = torch.tensor([True, False, True], device=DEV)
    p_t, p_r = pool.clone(), pool.clone()
    o = getattr(tri, f"gated_delta_rule_{form}")(q, k, v, g, beta, cu(lens), p_t, slots, has)
    o_ref = ref.gated_delta_rule_recurrent(q, k, v, g, beta, cu(lens), p_r, slots, has)
    assert p_t.dtype == torch.bfloat16
    assert rel_err(o, o_ref) < 1e-4
    assert rel_err(p_t[slots], p_r[slots]) < 1e-2
    assert not torch.equal(p_t[slots], pool[slots])
    assert torch.equal(p_t[[2, 4]], pool[[2, 4]])


@pytest.mark.gpu
def test_chunked_bf16_state_pool_gpu():
    """bf16 activations and a bf16 state pool (fused-output pipeline) against the fp32 reference
    run on the same bf16 pool."""
    lens = [1, 700, 64, 3000]
    q, k, v, g, beta = make(lens, 16, 32, 128, 128, seed=6, dtype=torch.bfloat16)
    c = cu(lens)
    pool = (torch.randn(len(lens) + 2, 32, 128, 128, device=DEV) * 0.05).bfloat16()
    slots = torch.arange(len(lens), device=DEV) + 1
    has = torch.tensor([True, False, True, True], device=DEV)
    pool_ref = pool.clone()
    o = tri.gated_delta_rule_chunked(q, k, v, g, beta, c, pool, slots, has, fuse_output=True)
    o_ref = ref.gated_delta_rule_chunked(q.float(), k.float(), v.float(), g, beta, c, pool_ref, slots, has)
    assert pool.dtype == torch.bfloat16
    assert rel_err(o, o_ref) < 2e-2
    assert rel_err(pool, pool_ref) < 2e-2
