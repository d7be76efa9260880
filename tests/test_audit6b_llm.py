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


def test_stop_token_ids_text_only_with_include_stop_str(tiny_ckpt):
    """As vLLM's detokenizer (and this server): the token that ended the output through
    stop_token_ids (or EOS) is not detokenized unless include_stop_str_in_output. LLM kept its text."""
    llm = LLM(model=tiny_ckpt, dtype="float32", device="cpu", max_model_len=128, max_num_seqs=2)
    greedy = {"temperature": 0, "ignore_eos": True}
    (base,) = llm.generate(["hello there"], SamplingParams(max_tokens=12, **greedy))
    ids = base.outputs[0].token_ids
    tok = llm.get_tokenizer()
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i] and tok.decode([ids[i]]).strip())
    want = {inc: llm.generate(["hello there"], SamplingParams(max_tokens=k + inc, **greedy))[0].outputs[0].text
            for inc in (False, True)}  # fmt: skip
    for inc in (False, True):
        sp = SamplingParams(max_tokens=12, stop_token_ids=[ids[k]], include_stop_str_in_output=inc, **greedy)
        (out,) = llm.generate(["hello there"], sp)
        o = out.outputs[0]
        assert (o.finish_reason, o.stop_reason, o.token_ids) == ("stop", ids[k], ids[: k + 1])
        assert o.text == want[inc], (inc, o.text, want)
