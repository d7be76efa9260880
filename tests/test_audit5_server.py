"""Audit (session 5): the real server (tiny checkpoint, default flags) against hostile or odd
requests a client can send: each is a 400 in the OpenAI envelope and the server stays responsive."""

import threading

import httpx
import pytest

openai = pytest.importorskip("openai")

from tests.helpers.server_harness import ServerHarness  # noqa: E402

USER = [{"role": "user", "content": "hi"}]
# nested loops: 10^10 iterations of Jinja (the sandbox caps each range at 100000, not their product)
SLOW_TEMPLATE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def srv(tiny_ckpt):
    h = ServerHarness(tiny_ckpt, "--served-model-name", "tiny")
    yield h
    h.close()


def _error(r: httpx.Response, param: str | None) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and err["code"] == 400 and err["param"] == param, err
    return err["message"]


@pytest.mark.parametrize("extra", [{"chat_template": SLOW_TEMPLATE},
                                   {"chat_template_kwargs": {"chat_template": SLOW_TEMPLATE}}])
def test_request_chat_template_needs_the_trust_flag(srv, client, extra):
    """vLLM's rule (--trust-request-chat-template, off by default): a request's template is Jinja
    the server would run on its event loop; before, this one hung every client."""
    done = threading.Event()
    result = {}

    def send():
        result["r"] = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                                 json={"model": "tiny", "messages": USER, "max_tokens": 2, **extra})
        done.set()

    threading.Thread(target=send, daemon=True).start()
    assert done.wait(10), "the server is rendering the request's template"
    assert "--trust-request-chat-template" in _error(result["r"], "chat_template")
    # the responses endpoint maps onto the chat path: same rule
    r = httpx.post(srv.url + "/v1/responses", timeout=30,
                   json={"model": "tiny", "input": "hi", "max_output_tokens": 2,
                         "chat_template_kwargs": {"chat_template": SLOW_TEMPLATE}})
    _error(r, "chat_template")
    assert client.chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices


def test_lone_surrogate_over_http(srv, client):
    body = b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "\\ud800"}]}'
    r = httpx.post(srv.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert "surrogate" in _error(r, "messages[0].content")
    r = httpx.post(srv.url + "/v1/completions", content=b'{"model": "tiny", "prompt": "a\\udfffb"}',
                   headers={"Content-Type": "application/json"})
    _error(r, "prompt")


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_stream_cut_inside_a_tool_call_finishes_with_length(srv, client):
    """max_tokens inside a call's arguments: the whole-text parse leaves the cut block in content
    with finish_reason "length"; the stream had said "tool_calls" over arguments that are no JSON."""
    pieces = ("x", "</think>", "\n\n", "<tool_call>", '\n{"name": "get_weather", "arguments": ',
              '{"city": "Pa', 'ris"}}\n', "</tool_call>")
    cut = len(srv.ids(*pieces[:-2]))  # the last token before the closing quote of "Paris"
    for stream in (False, True):
        srv.push(*pieces)
        r = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], max_tokens=cut,
                                           stream=stream)
        if not stream:
            assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
            continue
        chunks = [c for c in r if c.choices]
        args = "".join(t.function.arguments or "" for c in chunks for t in c.choices[0].delta.tool_calls or [])
        assert args == '{"city": "Pa'  # streamed before the cut was known
        assert chunks[-1].choices[0].finish_reason == "length"
    # a call that completes still finishes with tool_calls, streamed or not
    for stream in (False, True):
        srv.push(*pieces)
        r = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], max_tokens=60,
                                           stream=stream)
        reason = r.choices[0].finish_reason if not stream else [c for c in r if c.choices][-1].choices[0].finish_reason
        assert reason == "tool_calls"


def test_truncate_prompt_tokens_follows_vllm(srv, client):
    """-1 means max_model_len (was a 400); a value above max_model_len is a 400 (was accepted)."""
    long_prompt = "hello " * (srv.state.max_model_len + 50)
    r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": long_prompt, "max_tokens": 1,
                                                      "truncate_prompt_tokens": -1})
    # the whole context is the prompt: no room left to generate, vLLM's context error
    assert "maximum context length" in _error(r, "prompt")
    r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": long_prompt, "max_tokens": 1,
                                                      "truncate_prompt_tokens": 8})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 8
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 1,
                                                           "truncate_prompt_tokens": srv.state.max_model_len + 1})
    assert "greater than max_model_len" in _error(r, "truncate_prompt_tokens")
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 1,
                                                           "truncate_prompt_tokens": 0})
    _error(r, "truncate_prompt_tokens")
