"""The CUDA runner on a GPU (pytest -m gpu tests/gpu): decode steps replayed from CUDA graphs give
the eager forward's logits and cache contents (padded rows write nothing), and the engine on the
GPU in float32, graphs or eager, greedily generates the CPU engine's tokens."""

from __future__ import annotations

import pytest
import torch

from qwen3next.engine import EngineArgs, LLMEngine
from qwen3next.engine.cuda_graph import CudaGraphRunner
from qwen3next.forward_batch import ForwardBatch, ModelCache
from qwen3next.loader import load_model
from qwen3next.sampling_params import SamplingParams
from tests.helpers.model_cache import TinyCache

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def gpu_model(tiny_ckpt):
    m, _ = load_model(tiny_ckpt, dtype=torch.float32, device="cuda", with_mtp=False, progress=False)
    return m


def _to_cuda(tc: TinyCache) -> None:
    c = tc.cache
    c.kv = {i: t.cuda() for i, t in c.kv.items()}
    c.conv = {i: t.cuda() for i, t in c.conv.items()}
    c.recurrent = {i: t.cuda() for i, t in c.recurrent.items()}
    tc.tables = tc.tables.cuda()


def _cuda_batch(fb: ForwardBatch, cache: ModelCache) -> ForwardBatch:
    return ForwardBatch(cu_seqlens=fb.cu_seqlens.cuda(), seq_lens=fb.seq_lens, context_lens=fb.context_lens,
                        cache=cache, block_tables=fb.block_tables.cuda(), slot_mapping=fb.slot_mapping.cuda(),
                        state_slots=fb.state_slots.cuda())


def _clone(c: ModelCache) -> ModelCache:
    return ModelCache(kv={i: t.clone() for i, t in c.kv.items()}, conv={i: t.clone() for i, t in c.conv.items()},
                      recurrent={i: t.clone() for i, t in c.recurrent.items()}, block_size=c.block_size)


@torch.inference_mode()
def test_graph_replay_matches_eager_and_padding_writes_nothing(gpu_model):
    model = gpu_model
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(3)
    tc = TinyCache(model, num_seqs=4, max_len=128, block_size=16)
    _to_cuda(tc)
    for c in (tc.cache.conv, tc.cache.recurrent):  # unused slots hold noise a stray write would change
        for t in c.values():
            t.normal_()
    lens = [20, 33, 7]
    ids = torch.randint(0, V, (sum(lens),), generator=gen).cuda()
    pos = tc.positions([0, 1, 2], lens).cuda()
    model(ids, pos, _cuda_batch(tc.batch([0, 1, 2], lens), tc.cache))
    runner = CudaGraphRunner(model, tc.cache, tc.blocks_per_seq, max_batch=8, batch_sizes=[2, 4, 8])
    runner.capture()
    for step in range(3):
        sids = [0, 1, 2] if step < 2 else [2]  # 3 rows padded to 4, then 1 row padded to 2
        pos = tc.positions(sids, [1] * len(sids)).cuda()
        fb = tc.batch(sids, [1] * len(sids))
        tok = torch.randint(0, V, (len(sids),), generator=gen).cuda()
        ref_cache = _clone(tc.cache)
        ref = model.compute_logits(model(tok, pos, _cuda_batch(fb, ref_cache)))
        out = runner.run(tok, pos, _cuda_batch(fb, tc.cache)).clone()
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
        for name in ("kv", "conv", "recurrent"):
            for i, t in getattr(tc.cache, name).items():
                torch.testing.assert_close(t, getattr(ref_cache, name)[i], atol=1e-5, rtol=0, msg=f"{name}[{i}]")


def _generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    got = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] += out.outputs[0].token_ids
    return [got[str(i)] for i in range(len(prompts))]


def test_gpu_engine_greedy_equals_cpu_engine(tiny_ckpt, gpu_model):
    cpu_model, _ = load_model(tiny_ckpt, dtype=torch.float32, device="cpu", with_mtp=False, progress=False)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (1, 5, 17, 40, 130, 64)]
    knobs = dict(max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64)  # chunked prefill, mixed steps
    want = _generate(LLMEngine(cpu_model, EngineArgs(device="cpu", **knobs)), prompts, 12)
    graphs = LLMEngine(gpu_model, EngineArgs(device="cuda", **knobs))
    assert graphs.runner.graphs is not None
    assert _generate(graphs, prompts, 12) == want
    eager = LLMEngine(gpu_model, EngineArgs(device="cuda", enforce_eager=True, **knobs))
    assert eager.runner.graphs is None
    assert _generate(eager, prompts, 12) == want
