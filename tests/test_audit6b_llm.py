"""Audit (session 6b): LLM(tokenizer=...) with a model dir that has no tokenizer (load_format="dummy"
from config.json alone): the engine's structured outputs and sampled vocabulary use that tokenizer."""

import shutil

import pytest

from qwen3next import LLM, SamplingParams
from qwen3next.sampling_params import StructuredOutputsParams


@pytest.fixture(scope="module")
def config_only(tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("config_only_6b")
    shutil.copy(f"{tiny_ckpt}/config.json", d / "config.json")
    return str(d)


def test_structured_outputs_use_the_given_tokenizer(config_only, tiny_ckpt):
    pytest.importorskip("llguidance")
    llm = LLM(model=config_only, tokenizer=tiny_ckpt, load_format="dummy", dtype="float32", device="cpu",
              max_model_len=128, max_num_seqs=2)
    so = StructuredOutputsParams(choice=["yes", "no"])
    (out,) = llm.generate(["hello"], SamplingParams(max_tokens=8, temperature=0, structured_outputs=so))
    assert out.outputs[0].text in ("yes", "no")  # was: "structured outputs need the model's tokenizer.json"
    inner = getattr(llm.llm_engine.model, "inner", llm.llm_engine.model)
    assert inner.sampled_vocab_size == len(llm.get_tokenizer())
