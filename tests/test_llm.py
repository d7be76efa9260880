"""The offline LLM facade on the tiny checkpoint: prompt forms, text and logprobs of outputs,
stop strings (text cut at the string), generation_config defaults, chat rendering, bad input."""

from __future__ import annotations

import pytest
import torch

from qwen3next import LLM, SamplingParams

GREEDY = dict(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return LLM(model=tiny_ckpt, dtype="float32", device="cpu", max_model_len=512, max_num_seqs=8)


def test_generate_token_and_text_prompts(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("The quick brown fox")
    outs = llm.generate([{"prompt_token_ids": [5, 9, 2]}, "The quick brown fox"],
                        SamplingParams(logprobs=3, **GREEDY))
    assert [o.prompt for o in outs] == [None, "The quick brown fox"]
    assert outs[1].prompt_token_ids == ids and all(o.finished for o in outs)
    for o in outs:
        c = o.outputs[0]
        assert len(c.token_ids) == 12 and c.finish_reason == "length"
        assert c.text == tok.decode(c.token_ids)
        assert len(c.logprobs) == 12
        for t, d in zip(c.token_ids, c.logprobs):
            assert t in d and 3 <= len(d) <= 4
            assert max(d.values(), key=lambda lp: lp.logprob).rank == 1
        assert c.cumulative_logprob == pytest.approx(sum(d[t].logprob for t, d in zip(c.token_ids, c.logprobs)),
                                                     abs=1e-4)
    # the same prompt alone, as a single (non-list) prompt, gives the same greedy tokens
    alone = llm.generate({"prompt_token_ids": ids}, SamplingParams(**GREEDY))
    assert alone[0].outputs[0].token_ids == outs[1].outputs[0].token_ids


def test_stop_strings_cut_the_text(llm):
    full = llm.generate("Hello, world!", SamplingParams(**GREEDY))[0].outputs[0]
    text = full.text
    # a 2-character stop string first seen at offset >= 3
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2)
                if text[i:i + 2].strip() and text[i:i + 2] not in text[:i + 1])
    cut = text.index(stop)
    got = llm.generate(["Hello, world!"] * 2, [SamplingParams(stop=[stop, "\x00never"], **GREEDY),
                                               SamplingParams(stop=stop, include_stop_str_in_output=True, **GREEDY)])
    a, b = got[0].outputs[0], got[1].outputs[0]
    assert a.text == text[:cut] and (a.finish_reason, a.stop_reason) == ("stop", stop)
    assert b.text == text[:cut + len(stop)] and b.finish_reason == "stop"
    assert a.token_ids == full.token_ids[: len(a.token_ids)] and len(a.token_ids) < 12
    cache = llm.llm_engine.cache  # stopped samples gave their blocks and slots back
    assert (cache.num_free_blocks, cache.num_free_slots) == (cache.plan.num_blocks, cache.scratch_base)


def test_generation_config_supplies_defaults(llm):
    gen = llm.llm_engine.generation_config
    d = llm.get_default_sampling_params()
    assert (d.temperature, d.top_p, d.top_k) == (gen["temperature"], gen["top_p"], gen["top_k"])
    assert SamplingParams(temperature=0.0).with_generation_config(gen).temperature == 0.0
    # eos from generation_config stops a greedy run unless ignore_eos
    eos = set(gen["eos_token_id"])
    assert llm.llm_engine.eos_token_ids == frozenset(eos)


def test_n_samples_and_seed(llm):
    p = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    a = llm.generate("The user asks", p)[0]
    b = llm.generate(["The user asks", "Numbers like"], [p, SamplingParams(temperature=0.5, max_tokens=9)])[0]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def test_chat_renders_the_template(llm):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = llm.chat(msgs, SamplingParams(**GREEDY), chat_template_kwargs={"enable_thinking": False})[0]
    want = llm.get_tokenizer().apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)
    assert out.prompt == want and out.prompt_token_ids == llm.get_tokenizer().encode(want)
    two = llm.chat([msgs, msgs + [{"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Rome?"}]],
                   SamplingParams(**GREEDY))
    assert len(two) == 2 and two[0].outputs[0].token_ids


def test_bad_input_is_a_value_error(llm):
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"prompt_token_ids": "abc"})
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([5, 6])
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [1] * 510}, SamplingParams(max_tokens=5))
    assert not llm.llm_engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(model="unused", max_num_seqs=0)


def test_padding_ids_past_the_tokenizer_are_never_sampled(llm):
    tok, model = llm.get_tokenizer(), llm.llm_engine.model
    n, vocab = len(tok), model.config.vocab_size
    assert n < vocab, "the tiny checkpoint must have padding rows for this test to mean anything"
    logits = model.compute_logits(torch.zeros(2, model.config.hidden_size))
    assert torch.isinf(logits[:, n:]).all() and torch.isfinite(logits[:, :n]).all()
    # flat sampling over everything left: 8 x 64 draws, none of them a padding id
    outs = llm.generate([{"prompt_token_ids": [i + 1, 7]} for i in range(8)],
                        SamplingParams(temperature=5.0, max_tokens=64, ignore_eos=True, seed=3))
    drawn = [t for o in outs for t in o.outputs[0].token_ids]
    assert len(drawn) == 8 * 64 and max(drawn) < n
