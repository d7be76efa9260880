"""Prefix caching on the GPU (pytest -m gpu): the engine on CUDA in float32, decode replayed from
CUDA graphs, gives the same greedy tokens and logprobs with the cache as without it for prompts
sharing 0, 1 or 2 snapshot boundaries, and reports the reused tokens (the snapshot copies and
shared blocks are plain tensor index copies on the device)."""

from __future__ import annotations

import pytest
import torch

from qwen3next.engine import EngineArgs, LLMEngine
from qwen3next.sampling_params import SamplingParams
from tests.test_prefix_cache import BS, SB, assert_same, one_by_one, rand

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@torch.inference_mode()
def test_gpu_prefix_cache_hits_match_the_uncached_engine(tiny_ckpt):
    from qwen3next.loader import load_model

    model, _ = load_model(tiny_ckpt, dtype=torch.float32, device="cuda", with_mtp=False, progress=False)
    P = rand(45, 1)
    prompts = [P + rand(3, 2), P + rand(10, 3), P[:20] + rand(9, 4), P[:3] + rand(40, 5)]
    params = SamplingParams(max_tokens=20, temperature=0, logprobs=1)  # decode crosses boundaries
    outs = []
    for on in (False, True):
        eng = LLMEngine(model, EngineArgs(device="cuda", block_size=BS, enable_prefix_caching=on,
                                          prefix_caching_state_block=SB, max_model_len=256), eos_token_ids=[])
        assert eng.runner.graphs is not None
        outs.append(one_by_one(eng, prompts, params))
    assert_same(outs[0], outs[1])
    assert [c for _, _, c in outs[1]] == [0, 32, 16, 0]
