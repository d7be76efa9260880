"""Prompt logprobs through the server and the official openai client: /v1/completions with echo +
logprobs (lm-evaluation-harness's loglikelihood call, max_tokens 1 and 0), the vLLM extra
`prompt_logprobs` on completions and chat, streaming echo, and 400s for bad values."""

import pytest
import torch

openai = pytest.importorskip("openai")

from qwen3next.forward_batch import ForwardBatch  # noqa: E402
from tests.helpers.server_harness import ServerHarness  # noqa: E402

PROMPT = [(5 * i + 7) % 500 for i in range(20)]


@pytest.fixture(scope="module")
def srv(tiny_ckpt):
    h = ServerHarness(tiny_ckpt, "--max-num-seqs", "4", "--max-num-batched-tokens", "8")
    yield h
    h.close()


def reference(srv, ids: list[int]) -> torch.Tensor:
    """[L, V] log-softmax of a cache-less forward of the served model (row p predicts p + 1)."""
    model = srv.engine.model
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), ForwardBatch.full([len(ids)]))
        return torch.log_softmax(model.compute_logits(hidden), -1)


def test_echo_logprobs_is_lm_eval_loglikelihood(srv, client):
    ref = reference(srv, PROMPT)
    tok = srv.tok
    # lm-eval's request: token-id prompt, echo, max_tokens 1, logprobs 1, temperature 0
    r = client.completions.create(model=srv.state.served_names[0], prompt=PROMPT, echo=True, max_tokens=1,
                                  logprobs=1, temperature=0, extra_body={"ignore_eos": True})
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(PROMPT) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for p in range(1, len(PROMPT)):
        assert lp.token_logprobs[p] == pytest.approx(ref[p - 1, PROMPT[p]].item(), abs=1e-4)
        assert lp.tokens[p] == tok.decode([PROMPT[p]])
        best = ref[p - 1].max().item()
        assert max(lp.top_logprobs[p].values()) == pytest.approx(best, abs=1e-4)  # lm-eval's is_greedy
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert c.text.startswith(tok.decode(PROMPT)) and r.usage.completion_tokens == 1
    # max_tokens 0: the prompt alone
    z = client.completions.create(model=srv.state.served_names[0], prompt=PROMPT, echo=True, max_tokens=0,
                                  logprobs=2)
    zc = z.choices[0]
    assert zc.text == tok.decode(PROMPT) and zc.finish_reason == "length"
    assert zc.logprobs.token_logprobs == lp.token_logprobs[:-1] and len(zc.logprobs.tokens) == len(PROMPT)
    assert all(len(t) == 2 for t in zc.logprobs.top_logprobs[1:])
    assert z.usage.completion_tokens == 0 and z.usage.prompt_tokens == len(PROMPT)


def test_prompt_logprobs_extra_on_completions_and_chat(srv, client):
    ref = reference(srv, PROMPT)
    r = client.completions.create(model=srv.state.served_names[0], prompt=[PROMPT, PROMPT[:4]], max_tokens=2,
                                  extra_body={"prompt_logprobs": 2, "ignore_eos": True})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == len(PROMPT) and plp[0] is None
    for p in range(1, len(PROMPT)):
        entry = plp[p][str(PROMPT[p])]
        assert entry["logprob"] == pytest.approx(ref[p - 1, PROMPT[p]].item(), abs=1e-4)
        assert entry["rank"] == int((ref[p - 1] > ref[p - 1, PROMPT[p]]).sum()) + 1
        assert entry["decoded_token"] == srv.tok.decode([PROMPT[p]])
        assert 2 <= len(plp[p]) <= 3
    assert len(r.choices[1].model_extra["prompt_logprobs"]) == 4
    assert r.choices[0].logprobs is None  # prompt_logprobs alone adds no OpenAI logprobs
    chat = client.chat.completions.create(model=srv.state.served_names[0], max_tokens=2,
                                          messages=[{"role": "user", "content": "Hi there"}],
                                          extra_body={"prompt_logprobs": 0})
    cplp = chat.model_extra["prompt_logprobs"]
    assert len(cplp) == chat.usage.prompt_tokens and cplp[0] is None
    assert all(len(d) == 1 for d in cplp[1:])
    plain = client.chat.completions.create(model=srv.state.served_names[0], max_tokens=2,
                                           messages=[{"role": "user", "content": "Hi there"}])
    assert plain.model_extra.get("prompt_logprobs") is None


def test_streaming_echo_carries_prompt_logprobs(srv, client):
    srv.push(" ok")
    chunks = list(client.completions.create(model=srv.state.served_names[0], prompt=PROMPT[:6], echo=True,
                                            max_tokens=5, logprobs=1, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.startswith(srv.tok.decode(PROMPT[:6])) and text.endswith(" ok")
    lps = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert lps[0] is None and all(v is not None for v in lps[1:]) and len(lps) >= 6 + 1


@pytest.mark.parametrize("body, param", [
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_bad_values_are_400(srv, client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=srv.state.served_names[0], prompt="Hi", extra_body=body)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=srv.state.served_names[0], messages=[{"role": "user", "content": "x"}],
                                       extra_body={"prompt_logprobs": -2})


def test_forced_tool_call_keeps_the_prompt_logprobs(srv, client):
    # thinking template + named tool: phase 1 reasons, phase 2 (its own engine request) completes
    # the call; prompt logprobs are phase 1's, i.e. those of the plain request's prompt
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    msgs = [{"role": "user", "content": "Call f"}]
    name = srv.state.served_names[0]
    srv.push("ok\n", "</think>")
    auto = client.chat.completions.create(model=name, messages=msgs, tools=[tool], max_tokens=8,
                                          extra_body={"prompt_logprobs": 1})
    srv.push("ok\n", "</think>")
    srv.push('f", "arguments": {}}\n', "</tool_call>")  # (the prefill ends at the name's quote)
    forced = client.chat.completions.create(model=name, messages=msgs, tools=[tool], max_tokens=80,
                                            tool_choice={"type": "function", "function": {"name": "f"}},
                                            extra_body={"prompt_logprobs": 1})
    assert forced.choices[0].message.tool_calls[0].function.name == "f"
    assert forced.model_extra["prompt_logprobs"] == auto.model_extra["prompt_logprobs"]
    assert len(forced.model_extra["prompt_logprobs"]) == forced.usage.prompt_tokens
