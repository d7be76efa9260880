"""Audit (session 6b): /v1/completions streams honour stream_options.continuous_usage_stats (vLLM:
every chunk carries the usage so far), as /v1/chat/completions does; it was ignored."""

import json

import pytest

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def srv(tiny_ckpt):
    from tests.helpers.server_harness import ServerHarness

    h = ServerHarness(tiny_ckpt, "--served-model-name", "tiny")
    yield h
    h.close()


def test_completions_continuous_usage(srv):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 6, "ignore_eos": True, "stream": True, "n": 2,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    with_choices = [e for e in events if e["choices"]]
    assert with_choices and all(e.get("usage") for e in with_choices)
    counts = [e["usage"]["completion_tokens"] for e in with_choices]
    assert counts == sorted(counts) and counts[-1] == 12 == events[-1]["usage"]["completion_tokens"]
    assert all(e["usage"]["prompt_tokens"] == events[-1]["usage"]["prompt_tokens"] for e in with_choices)
    r = httpx.post(srv.url + "/v1/completions", timeout=60, json={**body, "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert [bool(e.get("usage")) for e in events] == [False] * (len(events) - 1) + [True]
