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
