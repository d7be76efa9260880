"""Audit (session 5): the offline API refuses what would fail later or sample garbage -- NaN / inf
sampling numbers, more logprobs than the vocabulary -- and takes vLLM's dtype spellings."""

from __future__ import annotations

import math

import pytest
import torch

from qwen3next import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return LLM(model=tiny_ckpt, dtype="float32", device="cpu", max_model_len=256, max_num_seqs=4)


@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("temperature", math.inf), ("repetition_penalty", math.nan),
    ("repetition_penalty", math.inf), ("top_p", math.nan), ("presence_penalty", math.nan),
])  # fmt: skip
def test_non_finite_sampling_numbers_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_logprobs_beyond_vocab_refused_and_engine_still_works(llm, field):
    with pytest.raises(ValueError, match=f"{field}: requested 1000000000"):
        llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2, **{field: 10**9}))
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2, temperature=0, logprobs=2))
    assert len(out[0].outputs[0].token_ids) == 2 and len(out[0].outputs[0].logprobs) == 2


@pytest.mark.parametrize("dtype", [torch.float32, "float"])
def test_vllm_dtype_spellings(tiny_ckpt, dtype):
    llm = LLM(model=tiny_ckpt, dtype=dtype, device="cpu", max_model_len=64, max_num_seqs=2)
    out = llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=1, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 1


def test_bad_tokenizer_path_is_one_line_before_loading(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"^tokenizer: model path .* is not a directory"):
        LLM(model=tiny_ckpt, tokenizer=str(tmp_path / "none"), device="cpu")


def test_model_dir_without_tokenizer_fails_before_the_model_loads(tiny_ckpt, tmp_path, monkeypatch):
    import shutil

    from qwen3next.engine import LLMEngine

    d = tmp_path / "notok"
    shutil.copytree(tiny_ckpt, d)
    for f in d.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges")):
            f.unlink()

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the tokenizer was checked")

    monkeypatch.setattr(LLMEngine, "from_args", no_load)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        LLM(model=str(d), device="cpu")


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 2**70])
def test_seed_outside_the_generator_range_refused(seed):
    with pytest.raises(ValueError, match="seed must be an integer in"):
        SamplingParams(seed=seed)
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
