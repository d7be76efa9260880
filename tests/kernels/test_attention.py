"""Triton paged attention (prefill with cached prefix, decode), KV write, output gate vs kernels/attention.py."""

from __future__ import annotations

import pytest
import torch

from qwen3next.kernels import attention as ref
from qwen3next.kernels.triton import attention as tri

from .conftest import DEV, cu, randn, rel_err, seeded


def paged_case(ctx, new, hq, hkv, D, bs, seed, dtype=torch.float32):
    """A cache with random block tables holding ctx + new tokens per sequence (new ones written)."""
    gen = seeded(seed)
    B = len(ctx)
    per = [-(-(c + n) // bs) for c, n in zip(ctx, new)]
    nblocks = sum(per) + 3
    kv = randn(nblocks, 2, bs, hkv, D, gen=gen, dtype=dtype)
    perm = torch.randperm(nblocks, generator=gen)
    bt = torch.zeros(B, max(per), dtype=torch.long)
    used = 0
    for b, p in enumerate(per):
        bt[b, :p] = perm[used : used + p]
        used += p
    q = randn(sum(new), hq, D, gen=gen, dtype=dtype)
    return q, kv, bt.to(DEV), cu(new), torch.tensor(ctx, device=DEV)


@pytest.mark.parametrize("ctx,new", [([0], [1]), ([0, 5], [63, 64]), ([30, 0, 17], [65, 3, 20])])
def test_prefill_with_prefix(ctx, new):
    q, kv, bt, c, cl = paged_case(ctx, new, hq=4, hkv=2, D=32, bs=8, seed=sum(new))
    o = tri.paged_attention(q, kv, bt, c, cl, 0.2)
    assert rel_err(o, ref.paged_attention(q, kv, bt, c, cl, 0.2)) < 1e-5


def new_rows(kv, bt, ctx, new, bs):
    """The new tokens' k, v rows [T, Hkv, D] read back from the pages (what the layer hands over)."""
    rows = [(b, p) for b, (c, n) in enumerate(zip(ctx, new)) for p in range(c, c + n)]
    blk = torch.tensor([int(bt[b, p // bs]) for b, p in rows], device=kv.device)
    off = torch.tensor([p % bs for _, p in rows], device=kv.device)
    return kv[blk, 0, off].contiguous(), kv[blk, 1, off].contiguous()


@pytest.mark.parametrize("new", [[1], [63], [64], [65], [500], [63, 64], [65, 3, 20], [1, 40, 1]])
def test_prefill_fresh(new, monkeypatch):
    """No cached prefix: the TMA kernel over the new k / v rows, directly and through the dispatch."""
    monkeypatch.setattr(tri, "PREFILL_FRESH", True)
    ctx = [0] * len(new)
    q, kv, bt, c, cl = paged_case(ctx, new, hq=4, hkv=2, D=32, bs=8, seed=sum(new) + 1)
    k, v = new_rows(kv, bt, ctx, new, 8)
    want = ref.paged_attention(q, kv, bt, c, cl, 0.2)
    assert rel_err(tri.prefill_fresh(q, k, v, c, 0.2), want) < 1e-5
    o = tri.paged_attention(q, kv, bt, c, cl, 0.2, k=k, v=v, fresh_lens=new)
    assert rel_err(o, want) < 1e-5


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_split_kv(splits):
    ctx = [0, 40, 7, 100]
    q, kv, bt, c, cl = paged_case(ctx, [1] * 4, hq=4, hkv=1, D=16, bs=16, seed=splits)
    o = tri.paged_attention(q, kv, bt, c, cl, 0.25, num_splits=splits)
    assert rel_err(o, ref.paged_attention(q, kv, bt, c, cl, 0.25)) < 1e-5


def test_write_kv_and_gate():
    gen = seeded(9)
    kv_t = randn(4, 2, 8, 2, 16, gen=gen)
    kv_r = kv_t.clone()
    k, v = randn(5, 2, 16, gen=gen), randn(5, 2, 16, gen=gen)
    slots = torch.tensor([3, -1, 17, 8, 31], device=DEV)
    tri.write_kv(k, v, kv_t, slots)
    ref.write_kv(k, v, kv_r, slots)
    assert torch.equal(kv_t, kv_r)
    o, g = randn(5, 4, 16, gen=gen), randn(5, 4, 16, gen=gen)
    assert rel_err(tri.gate_output(o, g), o * torch.sigmoid(g)) < 1e-6
    gs = randn(5, 4, 32, gen=gen)[..., 16:]  # the gate half of [query | gate], read in place
    assert rel_err(tri.gate_output(o, gs), o * torch.sigmoid(gs)) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("ctx,new", [([0, 1000], [2000, 37]), ([5000] * 8, [1] * 8), ([0], [4096]), ([0] * 3, [700, 1, 129]),
                                     ([0] * 4, [300] * 4), ([0], [1000])])
def test_attention_bf16_gpu(ctx, new, monkeypatch):
    """Every prefill path at the 80B attention shape (paged, TMA, cuDNN where lengths allow)."""
    q, kv, bt, c, cl = paged_case(ctx, new, hq=16, hkv=2, D=256, bs=16, seed=1, dtype=torch.bfloat16)
    k, v = new_rows(kv, bt, ctx, new, 16)
    want = ref.paged_attention(q.float(), kv.float(), bt, c, cl, 1 / 16)
    fresh = None if any(ctx) else new
    for cudnn, tma in ((False, False), (False, True), (True, False)):
        monkeypatch.setattr(tri, "DENSE_CUDNN", cudnn)
        monkeypatch.setattr(tri, "PREFILL_FRESH", tma)
        o = tri.paged_attention(q, kv, bt, c, cl, 1 / 16, k=k, v=v, fresh_lens=fresh)
        assert rel_err(o, want) < 1e-2, (cudnn, tma)
    if fresh and len(set(new)) == 1:
        assert tri.dense_causal_cudnn(q, k, v, len(new), 1 / 16) is not None  # cuDNN took it
