"""The tiny model run through kernels/ops.py with every Triton kernel switched on (under the
interpreter on CPU): cached prefill + decode must give the reference kernels' logits."""

from __future__ import annotations

import pytest
import torch

from qwen3next.kernels import ops
from qwen3next.kernels.triton import gdn_prep
from qwen3next.layers import gated_deltanet
from qwen3next.loader import load_model
from tests.helpers.model_cache import TinyCache

from .conftest import DEV


def _run(model, plan, seqs):
    tc = TinyCache(model, num_seqs=len(seqs), block_size=4)
    tc.cache.kv = {i: t.to(DEV) for i, t in tc.cache.kv.items()}
    tc.cache.conv = {i: t.to(DEV) for i, t in tc.cache.conv.items()}
    tc.cache.recurrent = {i: t.to(DEV) for i, t in tc.cache.recurrent.items()}
    done, logits = [0] * len(seqs), []
    for step in plan:
        sids, lens = list(step), list(step.values())
        pos = tc.positions(sids, lens).to(DEV)
        fb = tc.batch(sids, lens)
        for f in ("cu_seqlens", "block_tables", "slot_mapping", "state_slots"):
            setattr(fb, f, getattr(fb, f).to(DEV))
        ids = torch.cat([seqs[s][done[s] : done[s] + n] for s, n in step.items()]).to(DEV)
        logits.append(model.compute_logits(model(ids, pos, fb)))
        for s, n in step.items():
            done[s] += n
    return torch.cat(logits)


@torch.inference_mode()  # as the engine runs it
def test_cached_prefill_and_decode_through_triton_kernels(tiny_ckpt, monkeypatch):
    model, _ = load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    model = model.to(DEV)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 512, (80,), generator=gen), torch.randint(0, 512, (8,), generator=gen)]
    plan = [{0: 70, 1: 5}, {0: 7, 1: 1}, {0: 1, 1: 1}, {0: 1, 1: 1}]
    # the 70-token chunk copies q / k / v for the conv, the shorter steps hand it the projection
    monkeypatch.setattr(gated_deltanet, "GROUPED_MAX_T", 64)
    monkeypatch.setattr(gdn_prep, "FUSED", True)  # the fused DeltaNet path (default on CUDA; forced here for the interpreter)
    monkeypatch.setattr(ops, "_use_triton", lambda *t: False)
    ref = _run(model, plan, seqs)
    calls = []
    monkeypatch.setattr(ops, "_use_triton", lambda *t: calls.append(1) or True)
    out = _run(model, plan, seqs)
    assert len(calls) > 20  # the Triton paths really ran
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=0)


@pytest.mark.gpu
@torch.no_grad()
def test_cached_prefill_and_decode_gpu(tiny_ckpt, monkeypatch):
    model, _ = load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    model = model.to(DEV)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 512, (200,), generator=gen), torch.randint(0, 512, (30,), generator=gen)]
    plan = [{0: 130, 1: 5}, {0: 60, 1: 20}] + [{0: 1, 1: 1}] * 5
    monkeypatch.setattr(ops, "_use_triton", lambda *t: False)
    ref = _run(model, plan, seqs)
    monkeypatch.undo()
    out = _run(model, plan, seqs)  # the real dispatch: Triton on CUDA
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=0)  # tf32 dots in attention and MoE
