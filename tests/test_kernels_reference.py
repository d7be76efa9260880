"""The plain-torch kernels against their definitions: chunked delta rule == recurrent (lengths
around the 64-token chunk, varlen, states carried across calls, autograd, per-token snapshots);
varlen conv == token-by-token update; paged attention == dense causal attention; MoE experts ==
a naive per-token loop; YaRN tables == the numbers in architecture.md §6.4."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen3next.config import RopeConfig
from qwen3next.kernels import ops


def _cu(lens):
    return torch.tensor([0] + list(lens)).cumsum(0)


def _dr_inputs(lens, hk=2, hv=4, dk=16, dv=8, seed=0):
    g_ = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q = F.normalize(torch.randn(T, hk, dk, generator=g_), dim=-1) * dk**-0.5
    k = F.normalize(torch.randn(T, hk, dk, generator=g_), dim=-1)
    v = torch.randn(T, hv, dv, generator=g_)
    g = -F.softplus(torch.randn(T, hv, generator=g_) - 1)
    beta = torch.rand(T, hv, generator=g_)
    return q, k, v, g, beta


@pytest.mark.parametrize("lens", [[1], [63], [64], [65], [150], [65, 1, 150, 64, 63], [40, 40, 40]])
def test_chunked_equals_recurrent(lens):
    args = _dr_inputs(lens, seed=sum(lens))
    o_rec = ops.gated_delta_rule_recurrent(*args, _cu(lens))
    o_chk = ops.gated_delta_rule_chunked(*args, _cu(lens))
    assert o_chk.shape == (sum(lens), 4, 8)
    torch.testing.assert_close(o_chk, o_rec, atol=2e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["chunked", "recurrent"])
def test_delta_rule_state_carried_across_calls(kernel):
    fn = getattr(ops, f"gated_delta_rule_{kernel}")
    lens = [150, 70]
    q, k, v, g, beta = _dr_inputs(lens, seed=3)
    full = ops.gated_delta_rule_recurrent(q, k, v, g, beta, _cu(lens))
    # the same two sequences fed as (100 | 50) and (1 | 69) over two calls, states in slots 3 and 0
    pool = torch.randn(5, 4, 16, 8)  # garbage: has_initial_state=False must ignore it
    pool[3] = float("nan")  # even a never-written slot
    slots = torch.tensor([3, 0])
    split = [(0, 100, 150, 150), (150, 151, 220, 220)]
    first = torch.cat([torch.arange(a, b) for a, b, _, _ in split])
    second = torch.cat([torch.arange(b, c) for _, b, c, _ in split])
    pick = lambda idx: [t[idx] for t in (q, k, v, g, beta)]  # noqa: E731
    o1 = fn(*pick(first), _cu([100, 1]), pool, slots, torch.tensor([False, False]))
    o2 = fn(*pick(second), _cu([50, 69]), pool, slots, torch.tensor([True, True]))
    out = torch.empty_like(full)
    out[first], out[second] = o1, o2
    torch.testing.assert_close(out, full, atol=2e-5, rtol=0)
    # the final state in the pool continues exactly like the full sequence would
    q2, k2, v2, g2, b2 = _dr_inputs([1, 1], seed=4)
    cont = ops.gated_delta_rule_recurrent(q2, k2, v2, g2, b2, _cu([1, 1]), pool, slots, torch.tensor([True, True]))
    ref = ops.gated_delta_rule_recurrent(
        torch.cat([q[:150], q2[:1], q[150:], q2[1:]]), torch.cat([k[:150], k2[:1], k[150:], k2[1:]]),
        torch.cat([v[:150], v2[:1], v[150:], v2[1:]]), torch.cat([g[:150], g2[:1], g[150:], g2[1:]]),
        torch.cat([beta[:150], b2[:1], beta[150:], b2[1:]]), _cu([151, 71]))
    torch.testing.assert_close(cont, ref[[150, 221]], atol=2e-5, rtol=0)


def test_per_token_state_snapshots():
    q, k, v, g, beta = _dr_inputs([5], seed=5)
    pool = torch.zeros(8, 4, 16, 8)
    pts = torch.tensor([2, -1, 3, 4, -1])
    ops.gated_delta_rule_recurrent(q, k, v, g, beta, _cu([5]), pool, torch.tensor([1]), torch.tensor([False]),
                                   per_token_state_slots=pts)
    for t, slot in [(0, 2), (2, 3), (3, 4), (4, 1)]:
        ref = torch.zeros(2, 4, 16, 8)
        ops.gated_delta_rule_recurrent(*(x[: t + 1] for x in (q, k, v, g, beta)), _cu([t + 1]), ref,
                                       torch.tensor([0]), torch.tensor([False]))
        torch.testing.assert_close(pool[slot], ref[0], atol=1e-6, rtol=0)


def test_chunked_gradients_equal_recurrent():
    lens = [70, 9]
    base = _dr_inputs(lens, seed=6)
    grads = []
    for fn in (ops.gated_delta_rule_chunked, ops.gated_delta_rule_recurrent):
        xs = [t.clone().requires_grad_(True) for t in base]
        (fn(*xs, _cu(lens)) ** 2).sum().backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_conv_varlen_equals_token_by_token_update():
    C, K = 12, 4
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(C, K, generator=gen)
    lens = [9, 2, 1]
    x = torch.randn(sum(lens), C, generator=gen)
    y_full = ops.causal_conv1d_varlen(x, w, _cu(lens))
    # definition: zero history, w[:, K-1] on the current token
    start = 0
    for n in lens:
        xs = torch.cat([torch.zeros(K - 1, C), x[start : start + n]])
        ref = torch.stack([F.silu((xs[t : t + K].T * w).sum(-1)) for t in range(n)])
        torch.testing.assert_close(y_full[start : start + n], ref, atol=1e-6, rtol=0)
        start += n
    # token by token through a conv-state pool
    pool = torch.randn(4, C, K - 1)
    slots = torch.tensor([2, 0, 3])
    pool[slots] = 0
    ys = []
    for t in range(max(lens)):
        live = [i for i, n in enumerate(lens) if t < n]
        xt = torch.stack([x[sum(lens[:i]) + t] for i in live])
        ys.append((live, t, ops.causal_conv1d_update(xt, w, pool, slots[live])))
    for live, t, y in ys:
        for j, i in enumerate(live):
            torch.testing.assert_close(y[j], y_full[sum(lens[:i]) + t], atol=1e-6, rtol=0)


def test_conv_varlen_state_across_calls_and_short_chunks():
    C, K = 6, 4
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(C, K, generator=gen)
    x = torch.randn(20, C, generator=gen)
    full = ops.causal_conv1d_varlen(x, w, _cu([20]))
    pool = torch.full((2, C, K - 1), float("nan"))  # has_initial_state=False must ignore it
    outs, off = [], 0
    for i, n in enumerate([1, 2, 1, 10, 6]):  # pieces shorter than K-1 keep older history
        outs.append(ops.causal_conv1d_varlen(x[off : off + n], w, _cu([n]), pool, torch.tensor([1]),
                                             torch.tensor([i > 0])))
        off += n
    torch.testing.assert_close(torch.cat(outs), full, atol=1e-6, rtol=0)
    torch.testing.assert_close(pool[1], x[-(K - 1) :].T, atol=0, rtol=0)


def test_paged_attention_equals_dense_causal():
    gen = torch.Generator().manual_seed(9)
    Hq, Hkv, D, bs = 4, 2, 8, 4
    total = [11, 7]  # tokens per sequence: cached prefix + new
    ctx = [6, 0]
    q_all = [torch.randn(n, Hq, D, generator=gen) for n in total]
    k_all = [torch.randn(n, Hkv, D, generator=gen) for n in total]
    v_all = [torch.randn(n, Hkv, D, generator=gen) for n in total]
    cache = torch.zeros(10, 2, bs, Hkv, D)
    tables = torch.tensor([[7, 2, 5, 0], [1, 9, 3, 4]])
    for s in range(2):
        slots = torch.tensor([int(tables[s, p // bs]) * bs + p % bs for p in range(total[s])])
        ops.write_kv(k_all[s], v_all[s], cache, slots)
    new = [n - c for n, c in zip(total, ctx)]
    q = torch.cat([q_all[s][ctx[s]:] for s in range(2)])
    o = ops.paged_attention(q, cache, tables, _cu(new), torch.tensor(ctx), D**-0.5)
    ref = torch.cat([
        F.scaled_dot_product_attention(
            q_all[s].transpose(0, 1), k_all[s].repeat_interleave(2, 1).transpose(0, 1),
            v_all[s].repeat_interleave(2, 1).transpose(0, 1), is_causal=True,
        ).transpose(0, 1)[ctx[s]:]
        for s in range(2)
    ])
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=0)
    # cache-less varlen attention (per-sequence and equal-length batched paths) agrees too
    k, v = torch.cat(k_all), torch.cat(v_all)
    o2 = ops.causal_attention(torch.cat(q_all), k, v, _cu(total), D**-0.5)
    ref2 = torch.cat([
        F.scaled_dot_product_attention(
            q_all[s].transpose(0, 1), k_all[s].repeat_interleave(2, 1).transpose(0, 1),
            v_all[s].repeat_interleave(2, 1).transpose(0, 1), is_causal=True).transpose(0, 1)
        for s in range(2)
    ])
    torch.testing.assert_close(o2, ref2, atol=1e-5, rtol=0)
    qe = torch.randn(14, Hq, D, generator=gen)
    ke, ve = torch.randn(14, Hkv, D, generator=gen), torch.randn(14, Hkv, D, generator=gen)
    per_seq = torch.cat([ops.causal_attention(qe[i:i + 7], ke[i:i + 7], ve[i:i + 7], _cu([7]), 0.3) for i in (0, 7)])
    torch.testing.assert_close(ops.causal_attention(qe, ke, ve, _cu([7, 7]), 0.3), per_seq, atol=1e-5, rtol=0)


@pytest.mark.parametrize("renorm", [True, False])
def test_moe_route_and_experts_equal_naive(renorm):
    gen = torch.Generator().manual_seed(10)
    T, H, E, I, k = 9, 8, 6, 5, 2
    x = torch.randn(T, H, generator=gen)
    logits = torch.randn(T, E, generator=gen)
    gu, down = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    w, ids = ops.moe_route(logits, k, renorm)
    p = torch.softmax(logits, -1)
    top = p.topk(k, -1)
    torch.testing.assert_close(w, top.values / top.values.sum(-1, keepdim=True) if renorm else top.values)
    out = ops.moe_experts(x, gu, down, w, ids)
    ref = torch.zeros(T, H)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            h = F.silu(gu[e, :I] @ x[t]) * (gu[e, I:] @ x[t])
            ref[t] += w[t, j] * (down[e] @ h)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_norms():
    gen = torch.Generator().manual_seed(11)
    x, r, w = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen), torch.randn(8, generator=gen)
    rms = lambda a: a / torch.sqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    torch.testing.assert_close(ops.zc_rmsnorm(x, w, 1e-6), rms(x) * (1 + w))
    y, s = ops.zc_rmsnorm(x, w, 1e-6, residual=r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, rms(x + r) * (1 + w))
    z = torch.randn(3, 8, generator=gen)
    torch.testing.assert_close(ops.gated_rmsnorm(x, z, w, 1e-6), rms(x) * w * F.silu(z))


def test_yarn_table_matches_spec_numbers():
    """architecture.md §6.4 (80B, factor 4, L0 = 262144): pairs 0-14 keep their frequency, 22-31
    are divided by 4, 15-21 blended with the listed divisors; m = 1.13863."""
    base = RopeConfig(theta=1e7, rotary_dim=64)
    yarn = RopeConfig(theta=1e7, rotary_dim=64, rope_type="yarn", factor=4.0, original_max_position_embeddings=262144)
    inv0, m0 = ops.rope_inv_freq(base)
    inv, m = ops.rope_inv_freq(yarn)
    assert m0 == 1.0 and abs(m - 1.13863) < 1e-5
    div = inv0 / inv
    torch.testing.assert_close(div[:15], torch.ones(15))
    torch.testing.assert_close(div[22:], torch.full((10,), 4.0))
    blended = torch.tensor([1.103, 1.231, 1.391, 1.600, 1.882, 2.286, 2.909])
    torch.testing.assert_close(div[15:22], blended, atol=1e-3, rtol=0)
    cos, sin = ops.rope_cos_sin(torch.tensor([0, 5]), inv, m, torch.float32)
    torch.testing.assert_close(cos[0], torch.full((64,), m))
    x = torch.randn(2, 3, 256)
    y = ops.apply_rotary(x, cos, sin)
    torch.testing.assert_close(y[..., 64:], x[..., 64:], atol=0, rtol=0)  # pass-through dims untouched
