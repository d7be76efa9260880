"""Offline LLM audit (session 6) on the shipped demo model (trained: MTP drafts are often accepted,
so one step brings several tokens): stop strings end the output at the token that completes
them whatever the step size, and follow vLLM's min_tokens rule."""

from __future__ import annotations

import os

import pytest

from qwen3next import LLM, SamplingParams

DEMO = os.path.join(os.path.dirname(__file__), "..", "qwen3next", "demo_model")
PROMPTS = ["the cat sat on", "a big red house where", "then it ran to the", "many people live"]


@pytest.fixture(scope="module")
def plain():
    return LLM(DEMO, device="cpu", max_model_len=256, max_num_seqs=8)


def texts(outs):
    return [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason)
            for o in outs]


def test_stop_string_inside_an_accepted_draft_run_cuts_the_tokens_too(plain):
    """A verify step that accepted drafts past the stop string returned those extra token ids (and
    finished with the EOS among them): token_ids differed from plain decoding's."""
    mtp = LLM(DEMO, device="cpu", max_model_len=256, max_num_seqs=8, speculative_config={"num_speculative_tokens": 3})
    base = plain.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24))
    params = []
    for o in base:  # a stop string from the middle of each greedy answer
        t = o.outputs[0].text
        params.append(SamplingParams(temperature=0, max_tokens=24, stop=[t[len(t) // 2:len(t) // 2 + 2]], logprobs=0))
    want, got = plain.generate(PROMPTS, params), mtp.generate(PROMPTS, params)
    assert all(w[2] == "stop" for w in texts(want))
    assert texts(got) == texts(want)
    for o in got:  # the dropped tokens' logprobs leave the running sum too
        c = o.outputs[0]
        assert len(c.logprobs) == len(c.token_ids)
        assert abs(c.cumulative_logprob - sum(d[t].logprob for d, t in zip(c.logprobs, c.token_ids))) < 1e-9
    assert mtp.llm_engine.stats["spec_decode"]["num_accepted_tokens"] > 0


def test_min_tokens_ignores_stop_strings_ending_in_the_first_tokens(plain):
    """vLLM (PR 22014): a stop string counts only if it ends after the text of the first
    min_tokens tokens; one inside them ended the output early."""
    tok = plain.get_tokenizer()
    out = plain.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    ids = out.token_ids
    head = tok.decode(ids[:3])
    stop = next(c for c in head if c.strip() and out.text.count(c) > 1)  # in the first 3 tokens and later
    got = plain.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24, stop=[stop], min_tokens=3))
    text = got[0].outputs[0].text
    cut = out.text.index(stop, len(head))
    assert text == out.text[:cut] and got[0].outputs[0].finish_reason == "stop"
    early = plain.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))
    assert early[0].outputs[0].text == out.text[:out.text.index(stop)]
