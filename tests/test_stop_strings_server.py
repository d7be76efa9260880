"""Stop strings through the server (/v1/completions and /v1/chat/completions, streamed and not) on
the shipped demo model, with and without MTP speculative decoding (trained: drafts are often
accepted, so one step brings several tokens). The response (text, finish/stop reason, logprobs,
usage) must be the same whatever the step size, and a stop string counts only where it ends after
the text of the first min_tokens tokens (vLLM PR 22014).
"""

from __future__ import annotations

import json
import os

import pytest

httpx = pytest.importorskip("httpx")

from tests.helpers.server_harness import ServerHarness  # noqa: E402

DEMO = os.path.join(os.path.dirname(__file__), "..", "qwen3next", "demo_model")
PROMPTS = ["the cat sat on", "a big red house where", "then it ran to the", "many people live"]
MTP = '{"method": "qwen3_next_mtp", "num_speculative_tokens": 3}'


@pytest.fixture(scope="module")
def servers():
    plain = ServerHarness(DEMO, "--served-model-name", "demo", "--max-num-seqs", "4")
    mtp = ServerHarness(DEMO, "--served-model-name", "demo", "--max-num-seqs", "4", "--speculative-config", MTP)
    yield plain, mtp
    plain.close()
    mtp.close()


def post(h: ServerHarness, path: str, body: dict) -> dict:
    """One request -> the response with its choices and usage (a stream is folded into one)."""
    r = httpx.post(h.url + path, json={"model": "demo", "temperature": 0, **body}, timeout=60)
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        out = r.json()
        return {"choices": out["choices"], "usage": out["usage"]}
    choices: dict[int, dict] = {}
    usage = None
    for line in r.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        usage = ev.get("usage") or usage
        for c in ev["choices"]:
            acc = choices.setdefault(c["index"], {"text": "", "logprobs": [], "finish_reason": None,
                                                  "stop_reason": None})
            delta = c.get("delta", c)
            acc["text"] += delta.get("content") or delta.get("text") or ""
            lp = c.get("logprobs") or {}
            acc["logprobs"] += lp.get("content") or lp.get("token_logprobs") or []
            if c.get("finish_reason"):
                acc["finish_reason"], acc["stop_reason"] = c["finish_reason"], c.get("stop_reason")
    assert h.wait_idle()
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def completion(h, prompt: str, stream: bool, **kw) -> dict:
    body = {"prompt": prompt, "max_tokens": 24, "logprobs": 0, "stream": stream, **kw}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return post(h, "/v1/completions", body)


def chat(h, prompt: str, stream: bool, **kw) -> dict:
    # (the raw text as content: the demo model thinks first)
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "logprobs": True,
            "separate_reasoning": False, "stream": stream, **kw}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return post(h, "/v1/chat/completions", body)


def same(a, b) -> bool:
    """Equal, floats (logprobs: batched verify vs one-token forwards) within 1e-3."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) < 1e-3
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def text_of(resp: dict) -> str:
    c = resp["choices"][0]
    return c.get("text", c.get("message", {}).get("content"))


def tokens_of(resp: dict) -> list[str]:
    lp = resp["choices"][0]["logprobs"]
    return [e["token"] for e in lp["content"]] if "content" in lp else lp["tokens"]


def num_logprobs(resp: dict) -> int:
    lp = resp["choices"][0]["logprobs"]
    if isinstance(lp, list):  # (folded stream)
        return len(lp)
    return len(lp["content"] if "content" in lp else lp["token_logprobs"])


def mid_stops(h, api, stream: bool) -> list[str]:
    """A 2-character stop string from the middle of each prompt's greedy answer."""
    stops = []
    for p in PROMPTS:
        t = text_of(api(h, p, stream))
        stops.append(t[len(t) // 2:len(t) // 2 + 2])
    return stops


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", [completion, chat])
def test_stop_string_inside_a_speculative_step_drops_the_tokens_after_it(servers, api, stream):
    """A verify step that accepted drafts past the stop string counted those tokens in
    usage.completion_tokens and returned their logprobs: MTP's response differed from plain
    decoding's (with include_stop_str_in_output too)."""
    plain, mtp = servers
    accepted = mtp.engine.stats["spec_decode"]["num_accepted_tokens"]
    for p, stop in zip(PROMPTS, mid_stops(plain, api, stream)):
        for include in (False, True):
            want = api(plain, p, stream, stop=[stop], include_stop_str_in_output=include)
            c = want["choices"][0]
            assert c["finish_reason"] == "stop" and c["stop_reason"] == stop
            assert text_of(want).endswith(stop) == include
            assert num_logprobs(want) == want["usage"]["completion_tokens"]
            got = api(mtp, p, stream, stop=[stop], include_stop_str_in_output=include)
            assert same(got, want), (got, want)
    assert mtp.engine.stats["spec_decode"]["num_accepted_tokens"] > accepted


@pytest.mark.parametrize("stream", [False, True])
def test_stop_token_id_inside_a_speculative_step(servers, stream):
    """stop_token_ids end the output at that token under MTP as in plain decoding (stop_reason =
    the id; its text only with include_stop_str_in_output)."""
    plain, mtp = servers
    for p in PROMPTS[:2]:
        for api in (completion, chat):
            base = api(plain, p, False, return_tokens_as_token_ids=True)
            ids = [int(t.split(":")[1]) for t in tokens_of(base)]
            stop_id = ids[len(ids) // 2]
            for include in (False, True):
                kw = dict(stop_token_ids=[stop_id], include_stop_str_in_output=include)
                want = api(plain, p, stream, **kw)
                assert want["choices"][0]["stop_reason"] == stop_id
                assert num_logprobs(want) == want["usage"]["completion_tokens"]
                assert same(api(mtp, p, stream, **kw), want)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", [completion, chat])
def test_min_tokens_ignores_stop_strings_ending_in_the_first_tokens(servers, api, stream):
    """vLLM (PR 22014): a stop string counts only if it ends after the text of the first
    min_tokens tokens; one inside them ended the output early."""
    for h in servers:
        checked = 0
        for p in PROMPTS:
            base = api(h, p, False)
            text = text_of(base)
            head = "".join(tokens_of(base)[:3])
            if not text.startswith(head):
                continue
            stop = next((ch for ch in head if ch.strip() and ch in text[len(head):]), None)
            if stop is None:
                continue
            got = api(h, p, stream, stop=[stop], min_tokens=3)
            assert text_of(got) == text[:text.index(stop, len(head))], (text, stop)
            assert got["choices"][0]["stop_reason"] == stop
            early = api(h, p, stream, stop=[stop])
            assert text_of(early) == text[:text.index(stop)]
            checked += 1
        assert checked >= 2
