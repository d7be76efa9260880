"""The fused C++ CPU kernels (kernels/cpu_ext) against the plain-torch references: the DeltaNet
core over varlen batches (decode, short verify runs with per-token states, long prefill runs,
fresh / stale / skipped slots, states carried across calls), paged attention (decode, cached
prefix, GQA, scattered blocks), the ops dispatch and its switches, and whole-model steps.
The extension is built once per session; without a C++ compiler these tests skip (saying so)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from qwen3next.kernels import attention, cpu_ext, gdn, ops
from qwen3next.kernels.triton.gdn_decode_ref import gdn_decode_reference


@pytest.fixture(scope="session")
def ext():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the fused CPU kernels cannot be built here")
    mod = cpu_ext._build()
    assert mod is not None, "the C++ CPU kernels failed to build (see the warning above)"
    return mod


def _cu(lens):
    return torch.tensor([0] + list(lens)).cumsum(0)


def _gdn_args(lens, N=24, Hk=2, Hv=4, dk=16, dv=8, K=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T, C = sum(lens), 2 * Hk * dk + Hv * dv
    # m as a strided view of a wider projection, like the layer's
    m = torch.randn(T, C + 7, generator=gen)[:, :C]
    a, b = torch.randn(T, Hv, generator=gen), torch.randn(T, Hv, generator=gen)
    w = torch.randn(C, 1, K, generator=gen)[:, 0, :]
    conv, rec = torch.randn(N, C, K - 1, generator=gen), torch.randn(N, Hv, dk, dv, generator=gen)
    A_log, dt_bias = torch.rand(Hv, generator=gen) - 1, torch.randn(Hv, generator=gen)
    return m, a, b, w, conv, rec, A_log, dt_bias, Hk


def _both(monkeypatch, lens, slots, init, pts, seed=0, calls=1, **dims):
    """Run the fused kernel and the reference composition (QWEN3NEXT_KERNELS=torch) on copies of
    the same pools, `calls` times in a row (states carried), comparing outputs and both pools."""
    m, a, b, w, conv, rec, A_log, dt_bias, Hk = _gdn_args(lens, seed=seed, **dims)
    conv[5], rec[5] = float("nan"), float("nan")  # a fresh sequence's stale slot must be ignored
    pools = [(conv.clone(), rec.clone()), (conv.clone(), rec.clone())]
    cu, slots = _cu(lens), torch.tensor(slots)
    has = None if init is None else torch.tensor(init)
    pts = None if pts is None else torch.tensor(pts)
    for c in range(calls):
        mc = m + c  # new inputs each call
        o = cpu_ext.gdn_varlen(mc, a, b, w, *pools[0], cu, slots, has, pts, A_log, dt_bias, Hk)
        monkeypatch.setenv("QWEN3NEXT_KERNELS", "torch")
        ref = gdn.gdn_cached(mc, a, b, w, *pools[1], cu, slots, has, pts, A_log, dt_bias, Hk)
        monkeypatch.delenv("QWEN3NEXT_KERNELS")
        torch.testing.assert_close(o, ref, atol=2e-5, rtol=1e-4)
        for x, y in zip(pools[0], pools[1]):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4, equal_nan=True)
        has = torch.ones(len(lens), dtype=torch.bool)


@pytest.mark.parametrize("lens,slots,init,pts", [
    ([1, 1, 1], [3, 0, 7], None, None),  # decode
    ([3, 1, 0, 4], [0, 5, 2, 3], [True, False, True, True],  # verify: per-token states, a fresh one
     [10, -1, 11, 12, 13, 14, 15, 16]),
    ([40, 1, 17, 2], [1, 2, 5, 4], [False, True, False, True], None),  # prefill chunks + decode rows
])
def test_gdn_varlen_matches_reference(ext, monkeypatch, lens, slots, init, pts):
    _both(monkeypatch, lens, slots, init, pts, calls=2)


def test_gdn_varlen_demo_head_dims(ext, monkeypatch):
    _both(monkeypatch, [2, 33], [0, 1], [True, False], None, Hk=2, Hv=4, dk=32, dv=32, seed=3)


def test_gdn_decode_dispatch_and_skipped_slot(ext):
    m, a, b, w, conv, rec, A_log, dt_bias, Hk = _gdn_args([1] * 4, seed=4)
    slots = torch.tensor([6, 2, 9, 1])
    c1, r1, c2, r2 = conv.clone(), rec.clone(), conv.clone(), rec.clone()
    with torch.inference_mode():
        o = ops.gdn_decode(m, a, b, w, c1, r1, slots, A_log, dt_bias, Hk)
    ref = gdn_decode_reference(m, a, b, w, c2, r2, slots, A_log, dt_bias, Hk)
    torch.testing.assert_close(o, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(r1, r2, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(c1, c2, atol=0, rtol=0)
    # a negative slot (padding row): zero output, no state touched
    c3, r3 = conv.clone(), rec.clone()
    o = cpu_ext.gdn_varlen(m, a, b, w, c3, r3, _cu([1] * 4), torch.tensor([6, -1, 9, 1]), None, None, A_log,
                           dt_bias, Hk)
    assert torch.equal(o[1], torch.zeros_like(o[1])) and torch.equal(c3[2], conv[2]) and torch.equal(r3[2], rec[2])
    torch.testing.assert_close(o[[0, 2, 3]], ref[[0, 2, 3]], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("new,ctx,Hq,Hkv,D", [
    ([1] * 6, [5, 1, 30, 16, 17, 2], 4, 2, 16),  # decode, GQA
    ([9, 3, 1, 1, 20], [0, 7, 12, 3, 0], 4, 4, 8),  # mixed rows, a cached prefix
    ([2, 0, 40], [0, 5, 0], 2, 1, 64),  # long prefill, an empty row
])
def test_paged_attention_matches_reference(ext, new, ctx, Hq, Hkv, D):
    gen = torch.Generator().manual_seed(sum(new))
    bs, nb = 8, 40
    cache = torch.randn(nb, 2, bs, Hkv, D, generator=gen)
    need = [-(-(c + n) // bs) for c, n in zip(ctx, new)]
    perm = torch.randperm(nb, generator=gen)
    tables = torch.full((len(new), max(need) + 2), int(perm[-1]))  # past the end: someone else's block
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[used:used + n]
        used += n
    q = torch.randn(sum(new), Hq + 1, D, generator=gen)[:, :Hq]  # strided heads, like the layer's
    args = (q, cache, tables, _cu(new), torch.tensor(ctx), D**-0.5)
    torch.testing.assert_close(cpu_ext.paged_attention(*args), attention.paged_attention(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,norm", [(1, True), (37, False)])
def test_moe_dense_act_matches_reference(ext, T, norm):
    from qwen3next.kernels import cpu_fast

    gen = torch.Generator().manual_seed(T)
    Is, E, I, k = 12, 8, 6, 2
    y = torch.randn(T, 2 * Is + 1 + E * 2 * I + E + 3, generator=gen)[:, :-3]  # strided rows
    torch.testing.assert_close(cpu_ext.moe_dense_act(y, Is, E, I, k, norm),
                               cpu_fast.moe_dense_act(y, Is, E, I, k, norm), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,I", [(1, 12), (3, 16), (300, 16)])  # I % 8 == 0 and few rows: linear_into
def test_moe_route_and_grouped_experts_match_reference(ext, T, I):
    from qwen3next.kernels import moe

    gen = torch.Generator().manual_seed(T)
    H, E, k = 16, 8, 2
    x = torch.randn(T, H, generator=gen)
    gu, down = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    logits = torch.randn(T, E + 2, generator=gen)[:, :E]
    for norm in (True, False):
        w, ids = cpu_ext.moe_route(logits, k, norm)
        w_ref, ids_ref = moe.moe_route(logits, k, norm)
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(cpu_ext.moe_experts(x, gu, down, w, ids), moe.moe_experts(x, gu, down, w, ids),
                               atol=1e-4, rtol=1e-5)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ext.moe_experts(x, gu, down, w, ids + E)


@pytest.mark.parametrize("K,N", [(8, 1), (16, 13), (192, 37), (128, 8)])
def test_linear_matches_matmul_and_is_row_independent(ext, K, N):
    gen = torch.Generator().manual_seed(K + N)
    w = torch.randn(N, K, generator=gen)
    x = torch.randn(17, K + 5, generator=gen)[:, :K]  # strided rows, like a view of a wider output
    for M in (1, 2, 3, 4, 5, 8, 9, 17):
        y = cpu_ext.linear(x[:M], w)
        torch.testing.assert_close(y, x[:M] @ w.t(), atol=1e-4, rtol=1e-5)
        # each row's bits as if it were alone: a verify row equals its decode row
        assert all(torch.equal(y[i], cpu_ext.linear(x[i:i + 1], w)[0]) for i in range(M))
    assert cpu_ext.linear_fits(x, w) and not cpu_ext.linear_fits(x[:, :8], torch.randn(8, 6).t())  # w not row-major
    assert not cpu_ext.linear_fits(torch.randn(2, 12), torch.randn(3, 12))  # K % 8 != 0: torch's matmul
    a, b = torch.randn(2, 12), torch.randn(3, 12)
    torch.testing.assert_close(ops.linear(a, b), a @ b.t())


def test_small_ops_match_references(ext):
    from qwen3next.kernels import norm, rotary

    gen = torch.Generator().manual_seed(11)
    x, r = torch.randn(5, 64, generator=gen), torch.randn(5, 64, generator=gen)
    w = 0.3 * torch.randn(64, generator=gen)
    torch.testing.assert_close(cpu_ext.zc_rmsnorm(x, w, 1e-6), norm.zc_rmsnorm(x, w, 1e-6))
    for a, b in zip(cpu_ext.zc_rmsnorm(x, w, 1e-6, r), norm.zc_rmsnorm(x, w, 1e-6, r)):
        torch.testing.assert_close(a, b)
    xh, wh = torch.randn(5, 6, 16, generator=gen), 0.3 * torch.randn(6, 16, generator=gen)  # per-head weight
    torch.testing.assert_close(cpu_ext.zc_rmsnorm(xh, wh, 1e-6), norm.zc_rmsnorm(xh, wh, 1e-6))
    z = torch.randn(5, 6, 20, generator=gen)[..., :16]  # strided, like the layer's z
    torch.testing.assert_close(cpu_ext.gated_rmsnorm(xh, z, w[:16], 1e-6), norm.gated_rmsnorm(xh, z, w[:16], 1e-6))
    inv = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)  # rotary dim 8 of head dim 16
    cos, sin = rotary.rope_cos_sin(torch.arange(3, 8), inv, 1.0, torch.float32)
    torch.testing.assert_close(cpu_ext.apply_rotary(z, cos, sin), rotary.apply_rotary(z, cos, sin))
    torch.testing.assert_close(cpu_ext.gate_output(xh, z), xh * torch.sigmoid(z))
    c1, c2 = torch.randn(6, 2, 4, 3, 16, generator=gen), None
    c2 = c1.clone()
    k, v, slots = z[:, :3], xh[:, 3:], torch.tensor([0, 5, -1, 23, 9])
    cpu_ext.write_kv(k, v, c1, slots)
    attention.write_kv(k, v, c2, slots)
    assert torch.equal(c1, c2)


def test_switches_and_grad_fall_back(ext, monkeypatch):
    x = torch.zeros(2, dtype=torch.float32)
    assert cpu_ext.usable(x)
    assert not cpu_ext.usable(x.double())
    monkeypatch.setenv("QWEN3NEXT_CPU_EXT", "0")
    assert cpu_ext.get() is None and not cpu_ext.usable(x)
    monkeypatch.setenv("QWEN3NEXT_CPU_EXT", "1")
    monkeypatch.setenv("QWEN3NEXT_KERNELS", "torch")
    assert cpu_ext.get() is None


def test_failed_build_falls_back_with_one_warning(tmp_path):
    """No usable compiler: import and ops keep working on the torch paths; one warning, once."""
    import os
    import subprocess
    import sys

    code = ("import logging, torch; logging.basicConfig()\n"
            "from qwen3next.kernels import cpu_ext, ops\n"
            "with torch.inference_mode():\n"
            "    y = ops.zc_rmsnorm(torch.ones(2, 8), torch.zeros(8), 1e-6)\n"
            "    y = ops.zc_rmsnorm(torch.ones(2, 8), torch.zeros(8), 1e-6)\n"
            "print(cpu_ext.get() is None, round(float(y.sum()), 3))\n")
    env = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop("QWEN3NEXT_CPU_EXT", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "16.0"]
    assert r.stderr.count("C++ CPU kernels unavailable") == 1


def test_stale_build_lock_is_removed(tmp_path, monkeypatch):
    """A lock left by a killed build would make torch wait forever; a fresh one (a build running
    in another process) is left alone."""
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = cpu_ext._build_dir("probe")
    lock = os.path.join(path, "lock")
    open(lock, "w").close()
    assert cpu_ext._build_dir("probe") == path and os.path.exists(lock)
    old = time.time() - cpu_ext._STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    cpu_ext._build_dir("probe")
    assert not os.path.exists(lock)


def test_model_verify_and_decode_match_reference(ext, tiny_ckpt, monkeypatch):
    """Prefill, a verify-shaped step (per-token states) and decode through the whole tiny model:
    the fused kernels against QWEN3NEXT_KERNELS=torch, outputs and every state pool."""
    from qwen3next.forward_batch import ForwardBatch, ModelCache
    from qwen3next.loader import load_model

    model, _ = load_model(tiny_ckpt, dtype=torch.float32, device="cpu", with_mtp=False, progress=False)
    spec, bs = model.state_spec(), 8
    caches = []
    for _ in range(2):
        c = ModelCache(block_size=bs)
        c.kv = {i: torch.zeros(32, 2, bs, *s) for i, s in spec.kv_layers.items()}
        c.conv = {i: torch.zeros(16, *s) for i, s in spec.conv_layers.items()}
        c.recurrent = {i: torch.zeros(16, *s) for i, s in spec.recurrent_layers.items()}
        caches.append(c)
    gen = torch.Generator().manual_seed(8)
    ctx = [0, 0]
    tables = torch.arange(16).view(2, 8)
    for lens, pts in (([7, 12], None), ([3, 4], [2, 3, 4, 5, 6, 7, 8]), ([1, 1], None)):
        ids = torch.randint(0, model.config.vocab_size, (sum(lens),), generator=gen)
        pos = torch.cat([torch.arange(c, c + n) for c, n in zip(ctx, lens)])
        row = torch.repeat_interleave(torch.arange(2), torch.tensor(lens))
        outs = []
        for mode, cache in zip(("", "torch"), caches):
            monkeypatch.setenv("QWEN3NEXT_KERNELS", mode)
            batch = ForwardBatch(cu_seqlens=_cu(lens), seq_lens=lens, context_lens=list(ctx), cache=cache,
                                 block_tables=tables, slot_mapping=tables[row, pos // bs] * bs + pos % bs,
                                 state_slots=torch.tensor([0, 1]),
                                 per_token_state_slots=None if pts is None else torch.tensor(pts))
            with torch.inference_mode():
                outs.append(model.compute_logits(model(ids, pos, batch)))
        torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
        for name in ("kv", "conv", "recurrent"):
            for i, t in getattr(caches[0], name).items():
                torch.testing.assert_close(t, getattr(caches[1], name)[i], atol=1e-4, rtol=1e-4)
        ctx = [c + n for c, n in zip(ctx, lens)]


def test_mtp_forward_matches_torch_path(ext, tiny_ckpt, monkeypatch):
    """The MTP head as one C++ call (cpu_ext.mtp_forward) against its torch path over a prompt
    catch-up (9 tokens, last row only) and catch-up / draft steps of two sequences: all rows, some
    rows, none (KV only); outputs and the MTP layer's KV cache after every step."""
    from qwen3next.forward_batch import ForwardBatch, ModelCache
    from qwen3next.loader import load_model

    model, cfg = load_model(tiny_ckpt, dtype=torch.float32, device="cpu", with_mtp=True, progress=False)
    spec, bs = model.state_spec(), 4
    li = cfg.num_hidden_layers  # the MTP layer's KV cache index
    caches = []
    for _ in range(2):
        c = ModelCache(block_size=bs)
        c.kv = {li: torch.zeros(16, 2, bs, *spec.kv_layers[li])}
        caches.append(c)
    gen = torch.Generator().manual_seed(5)
    tables = torch.tensor([[3, 0, 5, 7], [1, 2, 4, 6]])  # scattered blocks
    ctx = [0, 0]
    calls = {"n": 0}
    real = cpu_ext.mtp_forward
    monkeypatch.setattr(cpu_ext, "mtp_forward", lambda *a: (calls.__setitem__("n", calls["n"] + 1), real(*a))[1])
    for lens, rows in (([9, 0], [8]), ([1, 2], [0, 2]), ([3, 1], None), ([2, 1], [2, 1]), ([1, 1], [])):
        T = sum(lens)
        ids = torch.randint(0, cfg.vocab_size, (T,), generator=gen)
        hidden = torch.randn(T, cfg.hidden_size, generator=gen)
        pos = torch.cat([torch.arange(c, c + n) for c, n in zip(ctx, lens)])
        row = torch.repeat_interleave(torch.arange(2), torch.tensor(lens))
        outs = []
        for mode, cache in zip(("", "torch"), caches):
            monkeypatch.setenv("QWEN3NEXT_KERNELS", mode)
            batch = ForwardBatch(cu_seqlens=_cu(lens), seq_lens=lens, context_lens=list(ctx), cache=cache,
                                 block_tables=tables, slot_mapping=tables[row, pos // bs] * bs + pos % bs,
                                 state_slots=torch.tensor([0, 1]))
            with torch.inference_mode():
                outs.append(model.mtp(ids, hidden, pos, batch, rows=rows))
        assert outs[0].shape == (T if rows is None else len(rows), cfg.hidden_size)
        torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(caches[0].kv[li], caches[1].kv[li], atol=1e-5, rtol=1e-5)
        ctx = [c + n for c, n in zip(ctx, lens)]
    assert calls["n"] == 5  # every step took the one-call path
