"""The speculative verify forward replayed from CUDA graphs (pytest -m gpu tests/gpu): hidden states,
logits and every cache (KV, conv and recurrent states, the per-position scratch slots) equal the
eager verify forward's; padded rows write nothing."""

from __future__ import annotations

import pytest
import torch

from qwen3next.engine.cuda_graph import VerifyGraphRunner
from qwen3next.loader import load_model
from tests.gpu.test_cuda_runner import _clone, _cuda_batch, _to_cuda
from tests.helpers.model_cache import TinyCache

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@torch.inference_mode()
def test_verify_graph_matches_eager(tiny_ckpt):
    model, _ = load_model(tiny_ckpt, dtype=torch.float32, device="cuda", with_mtp=False, progress=False)
    V, q = model.config.vocab_size, 3
    gen = torch.Generator().manual_seed(5)
    tc = TinyCache(model, num_seqs=12, max_len=128, block_size=16)  # slots 4.. are verify scratch
    _to_cuda(tc)
    for c in (tc.cache.conv, tc.cache.recurrent):  # noise a stray write would change
        for t in c.values():
            t.normal_()
    lens = [20, 33, 7]
    ids = torch.randint(0, V, (sum(lens),), generator=gen).cuda()
    pos = tc.positions([0, 1, 2], lens).cuda()
    model(ids, pos, _cuda_batch(tc.batch([0, 1, 2], lens), tc.cache))
    runner = VerifyGraphRunner(model, tc.cache, tc.blocks_per_seq, max_batch=4, tokens_per_seq=q, batch_sizes=[2, 4])
    runner.capture()
    for sids in ([0, 1, 2], [1]):  # 3 rows padded to 4, then 1 row padded to 2
        n = len(sids)
        pos = tc.positions(sids, [q] * n).cuda()
        fb = _cuda_batch(tc.batch(sids, [q] * n), tc.cache)
        # the state after positions 0..q-2 of row r goes to scratch slots 4 + r*(q-1) + j
        fb.per_token_state_slots = torch.tensor([4 + r * (q - 1) + j if j < q - 1 else -1
                                                 for r in range(n) for j in range(q)], device="cuda")
        tok = torch.randint(0, V, (n * q,), generator=gen).cuda()
        ref_cache = _clone(tc.cache)
        rb = _cuda_batch(fb, ref_cache)
        rb.per_token_state_slots = fb.per_token_state_slots
        ref_h = model(tok, pos, rb)
        ref = model.compute_logits(ref_h)
        assert runner.can_run(fb)
        h, out = runner.run(tok, pos, fb)
        torch.testing.assert_close(h, ref_h, atol=1e-4, rtol=0)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
        for name in ("kv", "conv", "recurrent"):
            for i, t in getattr(tc.cache, name).items():
                torch.testing.assert_close(t, getattr(ref_cache, name)[i], atol=1e-5, rtol=0, msg=f"{name}[{i}]")
