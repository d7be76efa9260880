"""load_format="dummy": random weights from config.json alone (no safetensors in the dir).

The weights are drawn per whole tensor and sharded afterwards, so two gloo ranks give the one-rank
dummy model's greedy tokens; activations stay finite and the weights are not the checkpoint's.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from qwen3next import LLM, SamplingParams
from qwen3next.forward_batch import ForwardBatch
from qwen3next.loader import CheckpointError, load_model

ENGINE = dict(dtype="float32", device="cpu", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
              skip_tokenizer_init=True, load_format="dummy")
GREEDY = dict(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [5, 17, 3, 99, 42, 7]}, {"prompt_token_ids": list(range(30, 55))}]


@pytest.fixture(scope="module")
def config_only(tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("config_only")
    shutil.copy(f"{tiny_ckpt}/config.json", d / "config.json")
    return str(d)


def test_dummy_needs_only_config_json(config_only, tiny_ckpt):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(config_only, dtype=torch.float32, progress=False)
    model, cfg = load_model(config_only, dtype=torch.float32, progress=False, load_format="dummy")
    again, _ = load_model(config_only, dtype=torch.float32, progress=False, load_format="dummy")
    real, _ = load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    for (n, p), (_, q), (_, r) in zip(model.named_parameters(), again.named_parameters(), real.named_parameters()):
        assert torch.equal(p, q), n  # deterministic
        assert p.shape == r.shape and not torch.equal(p, r), n
    ids = torch.arange(40) % cfg.vocab_size
    with torch.inference_mode():
        logits = model.compute_logits(model(ids, torch.arange(40), ForwardBatch.full([40])))
    assert torch.isfinite(logits).all() and 0.1 < logits.std().item() < 100


def test_bad_load_format_is_one_line(config_only):
    with pytest.raises(ValueError, match="load_format must be 'auto', 'safetensors' or 'dummy'"):
        load_model(config_only, load_format="pt")
    with pytest.raises(ValueError, match="load_format"):
        LLM(model=config_only, **{**ENGINE, "load_format": "npcache"})
    # vLLM's "safetensors" is what "auto" reads: a dir without weights says so, as "auto" does
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        LLM(model=config_only, **{**ENGINE, "load_format": "safetensors"})


def test_dummy_two_ranks_generate_the_one_rank_tokens(config_only):
    one = LLM(model=config_only, **ENGINE)
    want = [o.outputs[0].token_ids for o in one.generate(PROMPTS, SamplingParams(**GREEDY))]
    del one
    llm = LLM(model=config_only, tensor_parallel_size=2, **ENGINE)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(**GREEDY))]
    finally:
        llm.llm_engine.shutdown()
    assert got == want and len(set(want[0])) > 1
