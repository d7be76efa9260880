"""The batched CPU variants (kernels/cpu_fast.py) against the plain-torch references they stand in
for: paged attention (decode rows, prefill with a cached prefix, mixed, padded and one-by-one
groups), the DeltaNet decode step and conv update (states in place), mixed chunked batches
(decode rows split off), and both MoE paths (dense and grouped)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen3next.kernels import attention, conv1d, cpu_fast, delta_rule, moe
from qwen3next.kernels.triton.gdn_decode_ref import gdn_decode_reference


def _cu(lens):
    return torch.tensor([0] + list(lens)).cumsum(0)


@pytest.mark.parametrize("new,ctx", [
    ([1] * 6, [5, 1, 30, 16, 17, 2]),  # decode
    ([9, 3, 1, 1, 20], [0, 7, 12, 3, 0]),  # mixed, multi rows padded together
    ([2, 1, 40], [0, 30, 0]),  # multi rows too uneven to pad: one by one
])
def test_paged_attention(new, ctx):
    gen = torch.Generator().manual_seed(sum(new))
    Hq, Hkv, D, bs, nb = 4, 2, 8, 4, 40
    cache = torch.randn(nb, 2, bs, Hkv, D, generator=gen)
    need = [-(-(c + n) // bs) for c, n in zip(ctx, new)]
    perm = torch.randperm(nb, generator=gen)
    tables = torch.zeros(len(new), max(need) + 2, dtype=torch.long)
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[used:used + n]
        used += n
    tables[:, -1] = perm[-1]  # entries past a sequence's blocks point at someone else's block
    q = torch.randn(sum(new), Hq, D, generator=gen)
    args = (q, cache, tables, _cu(new), torch.tensor(ctx), D**-0.5)
    torch.testing.assert_close(cpu_fast.paged_attention(*args), attention.paged_attention(*args),
                               atol=1e-5, rtol=1e-5)


def _gdn_inputs(B, N=9, Hk=2, Hv=4, dk=16, dv=8, K=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    C = 2 * Hk * dk + Hv * dv
    m, a, b = torch.randn(B, C, generator=gen), torch.randn(B, Hv, generator=gen), torch.randn(B, Hv, generator=gen)
    w, A_log, dt_bias = torch.randn(C, K, generator=gen), torch.randn(Hv, generator=gen), torch.randn(Hv, generator=gen)
    conv, rec = torch.randn(N, C, K - 1, generator=gen), torch.randn(N, Hv, dk, dv, generator=gen)
    slots = torch.randperm(N, generator=gen)[:B]
    return m, a, b, w, conv, rec, slots, A_log, dt_bias, Hk


def test_gdn_decode_and_conv_update():
    m, a, b, w, conv, rec, slots, A_log, dt_bias, Hk = _gdn_inputs(5)
    c1, r1, c2, r2 = conv.clone(), rec.clone(), conv.clone(), rec.clone()
    o = cpu_fast.gdn_decode(m, a, b, w, c1, r1, slots, A_log, dt_bias, Hk)
    ref = gdn_decode_reference(m, a, b, w, c2, r2, slots, A_log, dt_bias, Hk)
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r1, r2, atol=1e-5, rtol=1e-5)  # untouched slots stay equal too
    torch.testing.assert_close(c1, c2, atol=0, rtol=0)
    c1, c2 = conv.clone(), conv.clone()
    torch.testing.assert_close(cpu_fast.causal_conv1d_update(m, w, c1, slots),
                               conv1d.causal_conv1d_update(m, w, c2, slots), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c1, c2, atol=0, rtol=0)


def _dr(lens, hk=2, hv=4, dk=16, dv=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q = F.normalize(torch.randn(T, hk, dk, generator=gen), dim=-1) * dk**-0.5
    k = F.normalize(torch.randn(T, hk, dk, generator=gen), dim=-1)
    return (q, k, torch.randn(T, hv, dv, generator=gen), -F.softplus(torch.randn(T, hv, generator=gen) - 1),
            torch.rand(T, hv, generator=gen))


@pytest.mark.parametrize("lens,init,slots", [
    ([1, 70, 1, 0, 5], [True, True, True, False, False], [2, 0, 5, 3, 6]),  # mixed: decode rows split off
    ([1, 1], [True, False], [2, 6]),  # a fresh one-token prompt is not a decode row
    ([1, 1, 1], [True, True, True], [2, 0, 5]),  # all decode
    ([1, 1, 1, 1], [True] * 4, [0, 1, 2, 3]),  # decode over a slot range: the state updated in place
    ([1, 1, 1, 1], [True] * 4, [3, 1, 0, 2]),  # ... in another order
    ([1, 1, 1, 1], [True] * 4, [5, 2, 3, 7]),  # ... with free slots 4 and 6 (NaN) inside: left as they are
])
@pytest.mark.parametrize("kernel", ["chunked", "recurrent"])
def test_delta_rule_batches(lens, init, slots, kernel):
    args = _dr(lens, seed=len(lens))
    pool = torch.randn(8, 4, 16, 8)
    pool[6] = float("nan")  # a fresh sequence must ignore its stale slot
    slots = torch.tensor(slots)
    has = torch.tensor(init)
    p1, p2 = pool.clone(), pool.clone()
    o = getattr(cpu_fast, f"gated_delta_rule_{kernel}")(*args, _cu(lens), p1, slots, has)
    ref = getattr(delta_rule, f"gated_delta_rule_{kernel}")(*args, _cu(lens), p2, slots, has)
    torch.testing.assert_close(o, ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(p1, p2, atol=2e-5, rtol=0, equal_nan=True)


@pytest.mark.parametrize("T", [3, 40, 300])
def test_moe_experts_dense_and_grouped(T):
    gen = torch.Generator().manual_seed(T)
    H, E, I, k = 16, 8, 12, 2
    x = torch.randn(T, H, generator=gen)
    gu, down = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    w, ids = moe.moe_route(torch.randn(T, E, generator=gen), k, True)
    ref = moe.moe_experts(x, gu, down, w, ids)
    for fn in (cpu_fast._moe_dense, cpu_fast._moe_grouped, cpu_fast.moe_experts):
        torch.testing.assert_close(fn(x, gu, down, w, ids), ref, atol=1e-4, rtol=1e-5)


def test_conv1d_varlen():
    gen = torch.Generator().manual_seed(5)
    lens, C, K = [7, 1, 0, 3, 12], 6, 4
    x, w = torch.randn(sum(lens), C, generator=gen), torch.randn(C, K, generator=gen)
    pool = torch.randn(8, C, K - 1, generator=gen)
    pool[4] = float("nan")  # a fresh sequence's stale slot
    slots, has = torch.tensor([1, 4, 6, 0, 2]), torch.tensor([True, False, True, False, True])
    p1, p2 = pool.clone(), pool.clone()
    torch.testing.assert_close(cpu_fast.causal_conv1d_varlen(x, w, _cu(lens), p1, slots, has),
                               conv1d.causal_conv1d_varlen(x, w, _cu(lens), p2, slots, has), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p1, p2, atol=0, rtol=0, equal_nan=True)
    fresh = cpu_fast.causal_conv1d_varlen(x, w, _cu(lens))
    torch.testing.assert_close(fresh, conv1d.causal_conv1d_varlen(x, w, _cu(lens)), atol=1e-5, rtol=1e-5)


def test_save_token_windows_equal_state_after_each_prefix():
    gen = torch.Generator().manual_seed(6)
    lens, C, K = [4, 1, 2], 5, 4
    x, w = torch.randn(sum(lens), C, generator=gen), torch.randn(C, K, generator=gen)
    pool = torch.randn(20, C, K - 1, generator=gen)
    slots, has = torch.tensor([0, 1, 2]), torch.tensor([True, False, True])
    token_slots = torch.tensor([3, -1, 5, 6, 7, 8, 9])
    p = pool.clone()
    conv1d.save_token_windows(x, _cu(lens), p, slots, has, token_slots)
    for s, n, b in ((0, 4, 0), (4, 1, 1), (5, 2, 2)):
        for t in range(n):
            if token_slots[s + t] < 0:
                continue
            ref = pool.clone()
            conv1d.causal_conv1d_varlen(x[s : s + t + 1], w, _cu([t + 1]), ref, slots[b : b + 1], has[b : b + 1])
            torch.testing.assert_close(p[token_slots[s + t]], ref[slots[b]], atol=0, rtol=0)
    assert torch.equal(p[4], pool[4])  # token 1 had no slot


def _step_batch(model, cache, lens, ctx, bs):
    """A ForwardBatch for sequences b = 0.. owning blocks [8b, 8b + 8) and state slot b."""
    B = len(lens)
    tables = torch.arange(B * 8).view(B, 8)
    pos = torch.cat([torch.arange(c, c + n) for c, n in zip(ctx, lens)])
    row = torch.repeat_interleave(torch.arange(B), torch.tensor(lens))
    slot_mapping = tables[row, pos // bs] * bs + pos % bs
    from qwen3next.forward_batch import ForwardBatch

    batch = ForwardBatch(cu_seqlens=_cu(lens), seq_lens=list(lens), context_lens=list(ctx), cache=cache,
                         block_tables=tables, slot_mapping=slot_mapping, state_slots=torch.arange(B))
    return pos, batch


def test_model_steps_match_reference_kernels(tiny_ckpt, monkeypatch):
    """Prefill, a mixed step, then decode through the whole tiny model: the CPU fast path (fused
    MoE, decode DeltaNet step, batched attention) against QWEN3NEXT_KERNELS=torch."""
    from qwen3next.forward_batch import ModelCache
    from qwen3next.loader import load_model

    model, _ = load_model(tiny_ckpt, dtype=torch.float32, device="cpu", with_mtp=False, progress=False)
    spec, bs = model.state_spec(), 4
    caches = []
    for _ in range(2):
        c = ModelCache(block_size=bs)
        c.kv = {i: torch.zeros(32, 2, bs, *s) for i, s in spec.kv_layers.items()}
        c.conv = {i: torch.zeros(4, *s) for i, s in spec.conv_layers.items()}
        c.recurrent = {i: torch.zeros(4, *s) for i, s in spec.recurrent_layers.items()}
        caches.append(c)
    gen = torch.Generator().manual_seed(8)
    ctx = [0, 0, 0]
    for lens in ([5, 9, 1], [1, 1, 3], [1, 1, 1], [1, 1, 1]):
        ids = torch.randint(0, model.config.vocab_size, (sum(lens),), generator=gen)
        outs = []
        for mode, cache in zip(("", "torch"), caches):
            monkeypatch.setenv("QWEN3NEXT_KERNELS", mode)
            pos, batch = _step_batch(model, cache, lens, ctx, bs)
            with torch.inference_mode():
                outs.append(model(ids, pos, batch))
        torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
        ctx = [c + n for c, n in zip(ctx, lens)]


def test_derived_weight_follows_parameter_changes():
    from qwen3next.layers.fused import DerivedWeight

    a, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.zeros(1, 3))
    d = DerivedWeight(lambda x, y: torch.cat([x, y]))
    with torch.inference_mode():
        assert d.get(a, b).sum() == 6
    with torch.no_grad():
        b.fill_(1.0)  # in place: the version counter moves
    assert d.get(a, b).sum() == 9
    b2 = torch.nn.Parameter(torch.full((1, 3), 2.0))  # a replaced parameter
    assert d.get(a, b2).sum() == 12
    with torch.inference_mode():  # parameters created as inference tensors have no version counter
        c = torch.ones(1, 3)
        assert d.get(a, c).sum() == 9


def test_recurrent_short_runs_with_per_token_states():
    """Speculative verify shape: a few tokens per sequence, the state after each saved to a slot."""
    lens, init = [3, 1, 0, 4], [True, False, True, True]
    args = _dr(lens, seed=9)
    pool = torch.randn(16, 4, 16, 8)
    pool[1] = float("nan")  # the fresh sequence's stale slot
    slots, has = torch.tensor([0, 1, 2, 3]), torch.tensor(init)
    pts = torch.tensor([4, -1, 6, 7, 8, 9, 10, 11])
    p1, p2 = pool.clone(), pool.clone()
    o = cpu_fast.gated_delta_rule_recurrent(*args, _cu(lens), p1, slots, has, pts)
    ref = delta_rule.gated_delta_rule_recurrent(*args, _cu(lens), p2, slots, has, pts)
    torch.testing.assert_close(o, ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(p1, p2, atol=2e-5, rtol=0, equal_nan=True)


def test_norms():
    from qwen3next.kernels import norm

    gen = torch.Generator().manual_seed(12)
    x, r, z = (torch.randn(5, 3, 16, generator=gen) for _ in range(3))
    w = 0.3 * torch.randn(16, generator=gen)
    torch.testing.assert_close(cpu_fast.zc_rmsnorm(x, w, 1e-6), norm.zc_rmsnorm(x, w, 1e-6))
    for a, b in zip(cpu_fast.zc_rmsnorm(x, w, 1e-6, r), norm.zc_rmsnorm(x, w, 1e-6, r)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(cpu_fast.gated_rmsnorm(x, z, w, 1e-6), norm.gated_rmsnorm(x, z, w, 1e-6))
    wh = 0.3 * torch.randn(3, 16, generator=gen)  # per-head weight
    torch.testing.assert_close(cpu_fast.zc_rmsnorm(x, wh, 1e-6), norm.zc_rmsnorm(x, wh, 1e-6))
