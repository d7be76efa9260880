"""Triton causal conv1d (varlen prefill with state pool, one-token update) against kernels/conv1d.py."""

from __future__ import annotations

import pytest
import torch

from qwen3next.kernels import conv1d as ref
from qwen3next.kernels.triton import conv1d as tri

from .conftest import DEV, cu, randn, rel_err, seeded


@pytest.mark.parametrize("lens", [[1], [63, 64, 65], [2, 500, 1]])
def test_varlen_fresh(lens):
    gen = seeded(sum(lens))
    C, K = 40, 4
    x, w = randn(sum(lens), C, gen=gen), randn(C, K, gen=gen)
    assert rel_err(tri.causal_conv1d_varlen(x, w, cu(lens)), ref.causal_conv1d_varlen(x, w, cu(lens))) < 1e-6


@pytest.mark.parametrize("split", [True, False])
def test_varlen_with_state_pool_short_and_long_runs(split, monkeypatch):
    """Fresh and continued sequences, runs shorter than the window, an empty one; the state rows in
    their own launch (SPLIT_STATE) or in the main one."""
    monkeypatch.setattr(tri, "SPLIT_STATE", split)
    gen = seeded(5)
    lens, C, K = [1, 2, 3, 70, 0], 24, 4
    x, w = randn(sum(lens), C, gen=gen), randn(C, K, gen=gen)
    pool = randn(7, C, K - 1, gen=gen)
    slots = torch.tensor([6, 0, 2, 3, 4], device=DEV)
    has = torch.tensor([True, True, False, True, False], device=DEV)
    p_t, p_r = pool.clone(), pool.clone()
    y = tri.causal_conv1d_varlen(x, w, cu(lens), p_t, slots, has)
    y_ref = ref.causal_conv1d_varlen(x, w, cu(lens), p_r, slots, has)
    assert rel_err(y, y_ref) < 1e-6
    assert torch.equal(p_t, p_r)


def test_update_steps_and_prefill_agree():
    """Prefill of 3 tokens then 4 single-token updates == the whole run of 7 as one prefill."""
    gen = seeded(6)
    C, K, B = 32, 4, 2
    x, w = randn(B, 7, C, gen=gen), randn(C, K, gen=gen)
    pool = torch.zeros(3, C, K - 1, device=DEV)
    slots = torch.tensor([2, 0], device=DEV)
    has = torch.zeros(B, dtype=torch.bool, device=DEV)
    y0 = tri.causal_conv1d_varlen(x[:, :3].reshape(-1, C), w, cu([3, 3]), pool, slots, has).view(B, 3, C)
    ys = [tri.causal_conv1d_update(x[:, t], w, pool, slots) for t in range(3, 7)]
    whole = ref.causal_conv1d_varlen(x.reshape(-1, C), w, cu([7, 7])).view(B, 7, C)
    assert rel_err(torch.cat([y0, torch.stack(ys, 1)], 1), whole) < 1e-6
    p_r = torch.zeros(3, C, K - 1, device=DEV)
    ref.causal_conv1d_varlen(x.reshape(-1, C), w, cu([7, 7]), p_r, slots, has)
    assert torch.equal(pool, p_r)


@pytest.mark.parametrize("lens", [[4, 1, 2], [1, 7]])
def test_save_token_windows_matches_reference(lens):
    """The window after every verify token, read from the run and the cached state (or zeros)."""
    gen = seeded(len(lens) + 9)
    C, K = 300, 4  # two channel blocks
    x = randn(sum(lens), C, gen=gen)
    pool = randn(20, C, K - 1, gen=gen)
    slots = torch.tensor([0, 1, 2][:len(lens)], device=DEV)
    has = torch.tensor([True, False, True][:len(lens)], device=DEV)
    token_slots = torch.arange(sum(lens), device=DEV) + 5
    token_slots[1] = -1
    p_t, p_r = pool.clone(), pool.clone()
    tri.save_token_windows(x, cu(lens), p_t, slots, has, token_slots)
    ref.save_token_windows(x, cu(lens), p_r, slots, has, token_slots)
    assert torch.equal(p_t, p_r)


@pytest.mark.gpu
def test_conv_bf16_gpu():
    gen = seeded(8)
    lens, C, K = [4000, 1, 77], 8192, 4
    x, w = randn(sum(lens), C, gen=gen, dtype=torch.bfloat16), randn(C, K, gen=gen, dtype=torch.bfloat16)
    pool = randn(4, C, K - 1, gen=gen, dtype=torch.bfloat16)
    slots, has = torch.tensor([1, 3, 0], device=DEV), torch.tensor([True, False, True], device=DEV)
    p_t, p_r = pool.clone(), pool.clone()
    y = tri.causal_conv1d_varlen(x, w, cu(lens), p_t, slots, has)
    assert rel_err(y, ref.causal_conv1d_varlen(x, w, cu(lens), p_r, slots, has)) < 1e-2
    assert torch.equal(p_t, p_r)
    xb = randn(256, C, gen=gen, dtype=torch.bfloat16)
    sl = torch.tensor([0, 1, 2] * 0 + list(range(3)), device=DEV)[:3]
    yu = tri.causal_conv1d_update(xb[:3], w, p_t, sl)
    assert rel_err(yu, ref.causal_conv1d_update(xb[:3], w, p_r, sl)) < 1e-2
    assert torch.equal(p_t, p_r)


def test_column_map_reads_a_wider_input_in_place():
    """x_cols: channel c is x[:, x_cols[c]] of a wider row-strided input (the layer's grouped
    projection), for the varlen conv with states and the one-token update."""
    gen = seeded(5)
    lens, C, K, W = [3, 9, 1], 24, 4, 40
    xw = randn(sum(lens), W + 3, gen=gen)[:, 3:]  # row stride W + 3
    cols = torch.randperm(W, generator=gen)[:C].to(DEV)
    w = randn(C, K, gen=gen)
    pool = randn(4, C, K - 1, gen=gen)
    slots, has = torch.tensor([2, 0, 3], device=DEV), torch.tensor([True, False, True], device=DEV)
    p_t, p_r = pool.clone(), pool.clone()
    y = tri.causal_conv1d_varlen(xw, w, cu(lens), p_t, slots, has, x_cols=cols)
    assert rel_err(y, ref.causal_conv1d_varlen(xw[:, cols], w, cu(lens), p_r, slots, has)) < 1e-6
    assert torch.equal(p_t, p_r)
    yu = tri.causal_conv1d_update(xw[:3], w, p_t, slots, x_cols=cols)
    assert rel_err(yu, ref.causal_conv1d_update(xw[:3, cols], w, p_r, slots)) < 1e-6
    assert torch.equal(p_t, p_r)


def test_qk_heads_normalised_in_the_epilogue():
    """qk_heads (Hk, dk): the first Hk q heads and Hk k heads of dk channels come out L2-normalised
    (q scaled by dk^-0.5); the v channels as the plain conv gives them."""
    gen = seeded(6)
    hk, dk, C, K, lens = 2, 16, 2 * 2 * 16 + 96, 4, [5, 70]
    x, w = randn(sum(lens), C, gen=gen), randn(C, K, gen=gen)
    y = tri.causal_conv1d_varlen(x, w, cu(lens), qk_heads=(hk, dk))
    plain = ref.causal_conv1d_varlen(x, w, cu(lens))
    q, k = plain[:, : hk * dk].view(-1, hk, dk), plain[:, hk * dk : 2 * hk * dk].view(-1, hk, dk)
    want_q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) * dk ** -0.5
    want_k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    assert rel_err(y[:, : hk * dk], want_q.reshape(-1, hk * dk)) < 1e-6
    assert rel_err(y[:, hk * dk : 2 * hk * dk], want_k.reshape(-1, hk * dk)) < 1e-6
    assert rel_err(y[:, 2 * hk * dk :], plain[:, 2 * hk * dk :]) < 1e-6


def test_grouped_map_is_vectorised_and_right():
    """The layer's map (runs of whole heads) is recognised as 16-aligned runs, also as an inference
    tensor (no version counter); a scattered map is not; both give the gathered input's conv."""
    gen = seeded(8)
    with torch.inference_mode():
        cols = (torch.arange(2)[:, None] * 80 + torch.arange(32)).flatten().to(DEV)  # 2 heads of 32 in rows of 80
    assert tri._map_run(cols) == 16
    assert tri._map_run(torch.randperm(64, generator=gen).to(DEV)) == 1  # gathered first, then MAP 0
    x, w = randn(20, 160, gen=gen), randn(64, 4, gen=gen)
    y = tri.causal_conv1d_varlen(x, w, cu([20]), x_cols=cols)
    assert rel_err(y, ref.causal_conv1d_varlen(x[:, cols], w, cu([20]))) < 1e-6


def _head_runs_map(hk: int, dk: int, rdv: int):
    """The DeltaNet layer's grouped map: head h's rows [q dk | k dk | v rdv | z rdv] -> (cols, width)."""
    W = 2 * dk + 2 * rdv
    base = torch.arange(hk)[:, None] * W
    cols = torch.cat([(base + torch.arange(dk)).flatten(), (base + dk + torch.arange(dk)).flatten(),
                      (base + 2 * dk + torch.arange(rdv)).flatten()])
    return cols.to(DEV), hk * W


@pytest.mark.parametrize("qk", [False, True])
def test_head_runs_map_read_in_place(qk):
    """A map of aligned 128-column runs (heads of 128) is read in place by the varlen conv (no
    gather): same output and states as the conv of the gathered input, with the q / k norm too."""
    gen = seeded(11 + qk)
    hk, dk, rdv, K, lens = 2, 128, 256, 4, [1, 40, 0, 5, 33]
    cols, W = _head_runs_map(hk, dk, rdv)
    C = cols.numel()
    assert tri._map_run(cols) == tri.MAP_BC
    xw = randn(sum(lens), W, gen=gen)
    w = randn(C, K, gen=gen)
    pool = randn(4, C, K - 1, gen=gen)
    slots = torch.tensor([2, 0, 1, 3, 1], device=DEV)[:len(lens)]
    has = torch.tensor([True, False, True, True, False], device=DEV)[:len(lens)]
    calls = []
    orig = torch.Tensor.index_select
    try:  # count gathers: the mapped path must not gather
        torch.Tensor.index_select = lambda self, *a: calls.append(1) or orig(self, *a)
        p_t = pool.clone()
        y = tri.causal_conv1d_varlen(xw, w, cu(lens), p_t, slots, has, x_cols=cols,
                                     qk_heads=(hk, dk) if qk else None)
    finally:
        torch.Tensor.index_select = orig
    assert not calls
    p_r = pool.clone()
    plain = ref.causal_conv1d_varlen(xw[:, cols], w, cu(lens), p_r, slots, has)
    assert torch.equal(p_t, p_r)
    if qk:  # q heads normalised and scaled, k heads normalised, v as the plain conv
        q, k = plain[:, : hk * dk].view(-1, hk, dk), plain[:, hk * dk : 2 * hk * dk].view(-1, hk, dk)
        plain[:, : hk * dk] = (q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) * dk ** -0.5).flatten(1)
        plain[:, hk * dk : 2 * hk * dk] = (k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)).flatten(1)
    assert rel_err(y, plain) < 1e-6


@pytest.mark.gpu
def test_head_runs_map_bf16_gpu():
    """The 80B layer's grouped projection at 8K tokens read in place = the copied input's conv."""
    gen = seeded(13)
    cols, W = _head_runs_map(16, 128, 256)
    C, K, lens = cols.numel(), 4, [8000, 192]
    xw = randn(sum(lens), W, gen=gen, dtype=torch.bfloat16)
    w = randn(C, K, gen=gen, dtype=torch.bfloat16)
    pool = randn(3, C, K - 1, gen=gen, dtype=torch.bfloat16)
    slots, has = torch.tensor([2, 0], device=DEV), torch.tensor([True, False], device=DEV)
    p_t, p_r = pool.clone(), pool.clone()
    y = tri.causal_conv1d_varlen(xw, w, cu(lens), p_t, slots, has, x_cols=cols, qk_heads=(16, 128))
    want = tri.causal_conv1d_varlen(xw[:, cols].contiguous(), w, cu(lens), p_r, slots, has, qk_heads=(16, 128))
    assert torch.equal(y, want)
    assert torch.equal(p_t, p_r)
    tri.SPLIT_STATE = not tri.SPLIT_STATE  # the other form of the state rows: the same values
    try:
        p_o = pool.clone()
        assert torch.equal(tri.causal_conv1d_varlen(xw, w, cu(lens), p_o, slots, has, x_cols=cols,
                                                    qk_heads=(16, 128)), y)
        assert torch.equal(p_o, p_t)
    finally:
        tri.SPLIT_STATE = not tri.SPLIT_STATE


def _stream_only(monkeypatch, cfg):
    """Route the varlen conv through the streaming kernel (small runs: sequence starts and run
    boundaries fall mid-program); the default kernels removed so that a fallback cannot pass."""
    monkeypatch.setattr(tri, "STREAM", True)
    monkeypatch.setattr(tri, "STREAM_CFG", cfg)
    for name in ("_conv_varlen_kernel", "_conv_varlen_norm_kernel", "_conv_varlen_map_kernel",
                 "_conv_varlen_map_norm_kernel"):
        monkeypatch.setattr(tri, name, None)


def _both(monkeypatch, cfg, *args, **kw):
    """(tiled kernel's y and pool, streaming kernel's y and pool) of the same call."""
    pool = args[3] if len(args) > 3 else None
    p_d = None if pool is None else pool.clone()
    with monkeypatch.context() as m:  # the tiled kernels (the streaming one is the default)
        m.setattr(tri, "STREAM", False)
        y_d = tri.causal_conv1d_varlen(*args[:3], p_d, *args[4:], **kw)
    with monkeypatch.context() as m:
        _stream_only(m, cfg)
        p_s = None if pool is None else pool.clone()
        y_s = tri.causal_conv1d_varlen(*args[:3], p_s, *args[4:], **kw)
    return y_d, p_d, y_s, p_s


@pytest.mark.parametrize("cfg", [(4, 8, 4, 2), (2, 5, 1, 1), (4, 6, 4, 3), (2, 7, 4, 4)])
@pytest.mark.parametrize("lens", [[1], [63], [64], [65], [500], [2, 500, 1], [1, 2, 3, 70, 0, 9]])
def test_stream_equals_default_and_reference(lens, cfg, monkeypatch):
    """QWEN3NEXT_CONV_STREAM: the streaming kernel (runs of tokens, inputs carried in registers) gives
    the default kernel's outputs bitwise and the reference's, states read from the pool (present,
    absent, fresh) and written back."""
    gen = seeded(sum(lens) + len(lens))
    C, K, B = 40, 4, len(lens)
    x, w = randn(sum(lens), C, gen=gen), randn(C, K, gen=gen)
    pool = randn(B + 2, C, K - 1, gen=gen)
    slots = (torch.randperm(B, generator=gen) + 2).to(DEV)
    has = (torch.arange(B) % 3 != 1).to(DEV)
    y_d, p_d, y_s, p_s = _both(monkeypatch, cfg, x, w, cu(lens), pool, slots, has)
    p_r = pool.clone()
    assert rel_err(y_s, ref.causal_conv1d_varlen(x, w, cu(lens), p_r, slots, has)) < 1e-6
    assert torch.equal(y_s, y_d)
    assert torch.equal(p_s, p_r) and torch.equal(p_s, p_d)
    _, _, y_f, _ = _both(monkeypatch, cfg, x, w, cu(lens))  # no state pool: zeros before each start
    assert rel_err(y_f, ref.causal_conv1d_varlen(x, w, cu(lens))) < 1e-6


@pytest.mark.parametrize("lens", [[1, 40, 0, 5, 33], [70]])
def test_stream_head_map_and_qk_norm(lens, monkeypatch):
    """The streaming kernel over the layer's grouped map read in place (heads of 128), with the q / k
    norm in its epilogue (one head per channel block); and the norm over an unmapped input with
    small heads (dk 16): bitwise the default kernel, and right."""
    gen = seeded(21 + len(lens))
    hk, dk, rdv, K = 2, 128, 256, 4
    cols, W = _head_runs_map(hk, dk, rdv)
    C = cols.numel()
    xw, w = randn(sum(lens), W, gen=gen), randn(C, K, gen=gen)
    pool = randn(len(lens) + 1, C, K - 1, gen=gen)
    slots = torch.arange(len(lens), device=DEV) + 1
    has = torch.tensor([True, False, True, True, False], device=DEV)[:len(lens)]
    y_d, p_d, y_s, p_s = _both(monkeypatch, (4, 8, 4, 2), xw, w, cu(lens), pool, slots, has, x_cols=cols,
                               qk_heads=(hk, dk))
    assert torch.equal(y_s, y_d) and torch.equal(p_s, p_d)
    p_r = pool.clone()
    plain = ref.causal_conv1d_varlen(xw[:, cols], w, cu(lens), p_r, slots, has)
    assert torch.equal(p_s, p_r)
    q, k = plain[:, : hk * dk].view(-1, hk, dk), plain[:, hk * dk : 2 * hk * dk].view(-1, hk, dk)
    plain[:, : hk * dk] = (q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) * dk ** -0.5).flatten(1)
    plain[:, hk * dk : 2 * hk * dk] = (k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)).flatten(1)
    assert rel_err(y_s, plain) < 1e-6
    hk, dk, C = 2, 16, 2 * 2 * 16 + 96
    x, w = randn(sum(lens), C, gen=gen), randn(C, K, gen=gen)
    y_d, _, y_s, _ = _both(monkeypatch, (4, 8, 4, 2), x, w, cu(lens), qk_heads=(hk, dk))
    assert torch.equal(y_s, y_d)
    assert rel_err(y_s[:, 2 * hk * dk :], ref.causal_conv1d_varlen(x, w, cu(lens))[:, 2 * hk * dk :]) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", tri.STREAM_CONFIGS)
def test_stream_bf16_gpu(cfg, monkeypatch):
    """The streaming kernel on the 80B layer's grouped map at 8K tokens (state pool, q / k norm), each
    config: the default kernel's output up to the silu's fast division (a bf16 rounding here and
    there), the same states."""
    gen = seeded(14)
    cols, W = _head_runs_map(16, 128, 256)
    C, K, lens = cols.numel(), 4, [8000, 1, 191]
    xw = randn(sum(lens), W, gen=gen, dtype=torch.bfloat16)
    w = randn(C, K, gen=gen, dtype=torch.bfloat16)
    pool = randn(4, C, K - 1, gen=gen, dtype=torch.bfloat16)
    slots, has = torch.tensor([2, 0, 3], device=DEV), torch.tensor([True, False, True], device=DEV)
    y_d, p_d, y_s, p_s = _both(monkeypatch, cfg, xw, w, cu(lens), pool, slots, has, x_cols=cols, qk_heads=(16, 128))
    assert rel_err(y_s, y_d) < 2e-3
    assert (y_s.float() - y_d.float()).abs().max() <= 0.02 * y_d.float().abs().max()
    assert torch.equal(p_s, p_d)
