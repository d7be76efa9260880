"""Audit (session 5): tensor parallelism on CPU through the offline API -- bad sizes are one line
before anything starts; a deleted tensor-parallel LLM releases its workers and group, so a second
one can start in the same process; a 1-rank LLM next to a live tensor-parallel one is refused
(its layers would take the live group's shard sizes and hang in a collective)."""

from __future__ import annotations

import gc

import pytest

from qwen3next import LLM, SamplingParams
from qwen3next.train.cli import default_model_dir

ENGINE = dict(device="cpu", dtype="float32", max_model_len=128, max_num_seqs=2)
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.mark.parametrize("size,match", [
    (0, "tensor_parallel_size must be a positive integer"), (3, "not divisible by tensor_parallel_size"),
    (8, "not divisible by tensor_parallel_size"),
])  # fmt: skip
def test_bad_sizes_are_one_line(size, match):
    with pytest.raises(ValueError, match=match):
        LLM(default_model_dir(), tensor_parallel_size=size, **ENGINE)


def test_second_tensor_parallel_llm_after_del(tmp_path):
    prompt = {"prompt_token_ids": [5, 6, 7]}
    ref = LLM(default_model_dir(), **ENGINE).generate(prompt, GREEDY)[0].outputs[0].token_ids
    a = LLM(default_model_dir(), tensor_parallel_size=2, **ENGINE)
    assert a.generate(prompt, GREEDY)[0].outputs[0].token_ids == ref
    with pytest.raises(ValueError, match="tensor-parallel LLM is alive"):
        LLM(default_model_dir(), **ENGINE)
    workers = list(a.llm_engine.model.workers)
    del a
    gc.collect()
    assert not any(p.is_alive() for p in workers)
    b = LLM(default_model_dir(), tensor_parallel_size=2, **ENGINE)
    try:
        assert b.generate(prompt, GREEDY)[0].outputs[0].token_ids == ref
    finally:
        b.llm_engine.shutdown()
    assert LLM(default_model_dir(), **ENGINE).generate(prompt, GREEDY)[0].outputs[0].token_ids == ref
