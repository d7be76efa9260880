"""Client errors -> 400/401/404 in the OpenAI envelope, overload -> 503 + Retry-After, and a client
that disconnects (streaming or not) gets its request aborted and its cache freed."""

import threading

import httpx
import pytest

openai = pytest.importorskip("openai")

from tests.helpers.server_harness import ServerHarness  # noqa: E402

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def srv(tiny_ckpt):
    h = ServerHarness(tiny_ckpt, "--served-model-name", "tiny", "--max-num-seqs", "2", "--max-waiting", "2",
                      "--max-model-len", "256")
    yield h
    h.close()


@pytest.fixture
def client(srv):
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="EMPTY", max_retries=0)
    assert srv.wait_idle(), "a request left cache blocks or state slots behind"


def post(srv, path="/v1/chat/completions", **kw):
    return httpx.post(srv.url + path, timeout=30, **kw)


def error(resp, status, param):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert err["param"] == param, err
    return err


def test_invalid_json_and_wrong_types(srv, client):
    error(post(srv, content=b"{nope", headers={"content-type": "application/json"}), 400, None)
    error(post(srv, json={"model": "tiny", "messages": USER, "temperature": "hot"}), 400, "temperature")
    error(post(srv, json={"model": "tiny", "messages": "hi"}), 400, "messages")
    error(post(srv, json={"model": "tiny", "messages": [{"role": "user", "content": 5}]}), 400,
          "messages[0].content")
    error(post(srv, "/v1/completions", json={"model": "tiny", "prompt": {"a": 1}}), 400, "prompt")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=USER, n="two")


@pytest.mark.parametrize("field,value", [("max_tokens", -1), ("n", 0), ("n", 100000), ("top_p", 7),
                                         ("temperature", -1), ("top_logprobs", 50), ("seed", 2**70),
                                         ("presence_penalty", 9)])
def test_absurd_values(srv, client, field, value):
    body = {"model": "tiny", "messages": USER, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    err = error(post(srv, json=body), 400, field)
    assert err["type"] == "BadRequestError"


def test_unknown_model_and_roles(srv, client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=USER)
    error(post(srv, json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}), 400,
          "messages[0].role")


def test_context_length(srv, client):
    long = "the quick brown fox " * 200
    err = error(post(srv, json={"model": "tiny", "messages": [{"role": "user", "content": long}]}), 400, "messages")
    assert err["message"].startswith("This model's maximum context length is 256 tokens")
    err = error(post(srv, json={"model": "tiny", "messages": USER, "max_tokens": 1000}), 400, "max_tokens")
    assert "maximum context length" in err["message"]
    error(post(srv, "/v1/completions", json={"model": "tiny", "prompt": long}), 400, "prompt")


def test_api_key(srv, client):
    srv.state.api_key = "sekret"
    try:
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="tiny", messages=USER, max_tokens=1)
        r = httpx.get(srv.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
        assert httpx.get(srv.url + "/health").status_code == 200  # open paths stay open
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        assert ok.chat.completions.create(model="tiny", messages=USER, max_tokens=1).choices
    finally:
        srv.state.api_key = None


def _slow_stream(srv, started: threading.Event, stop: threading.Event):
    srv.sampler.delay = 0.01  # 200 tokens take >= 2 s however fast the engine is
    body = {"model": "tiny", "messages": USER, "max_tokens": 200, "stream": True, "ignore_eos": True}
    try:
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
            for _ in r.iter_lines():
                started.set()
                if stop.is_set():
                    break
    finally:
        srv.sampler.delay = 0.0


def test_queue_full_gives_503_with_retry_after(srv, client):
    srv.state.engine.capacity = 1
    started, stop = threading.Event(), threading.Event()
    t = threading.Thread(target=_slow_stream, args=(srv, started, stop))
    t.start()
    try:
        assert started.wait(20)
        r = post(srv, json={"model": "tiny", "messages": USER, "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == 503
    finally:
        stop.set()
        t.join(30)
        srv.state.engine.capacity = 4


def test_disconnect_mid_stream_aborts_and_frees_cache(srv, client):
    started, stop = threading.Event(), threading.Event()
    stop.set()  # read one line, then close the connection
    n_aborted = len(srv.aborted)
    _slow_stream(srv, started, stop)
    assert started.is_set()
    assert srv.wait_idle(10), "stream abandoned by its client still holds cache"
    assert len(srv.aborted) == n_aborted + 1


def test_disconnect_non_streaming_aborts(srv, client):
    body = {"model": "tiny", "messages": USER, "max_tokens": 200, "ignore_eos": True}
    n_aborted = len(srv.aborted)
    srv.sampler.delay = 0.01  # 200 tokens take >= 2 s however fast the engine is
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=0.5)
    finally:
        srv.sampler.delay = 0.0
    assert srv.wait_idle(10)
    assert len(srv.aborted) == n_aborted + 1
    assert srv.state.engine.num_live_requests == 0


def test_load_benchmark_leaves_nothing_behind(srv, client):
    import argparse
    import asyncio
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "bench_server_load.py")
    spec = importlib.util.spec_from_file_location("bench_server_load", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ns = argparse.Namespace(clients=8, duration=3.0, max_tokens=12, hang_up=0.3)
    stats = asyncio.run(bench.run(srv.url, "tiny", ns))
    assert not stats.failures, stats.failures
    assert stats.outcomes.get("completed", 0) > 0 and stats.outcomes.get("http_503", 0) > 0
    assert stats.ttft and stats.itl
    assert max(stats.health) < 2.0  # the HTTP side answers while the engine thread works


def test_wrong_path_method_and_min_tokens(srv, client):
    error(post(srv, json={"model": "tiny", "messages": USER, "max_tokens": 2, "n": 5}), 400, "n")  # > capacity 4
    error(httpx.get(srv.url + "/v1/chat/completions"), 405, None)
    error(httpx.get(srv.url + "/v1/nothing"), 404, None)
    error(post(srv, json={"model": "tiny", "messages": USER, "max_tokens": 2, "min_tokens": 5}), 400, "min_tokens")


def test_chat_template_flag(tiny_ckpt, tmp_path):
    from qwen3next.chat_template import builtin_template

    f = tmp_path / "instruct.jinja"
    f.write_text(builtin_template("qwen3_next_instruct"), encoding="utf-8")
    h = ServerHarness(tiny_ckpt, "--served-model-name", "tiny", "--chat-template", str(f))
    try:
        assert h.state.reasoning_parser is None  # the Instruct template opens no think block
        h.push("Plain answer.")
        r = openai.OpenAI(base_url=h.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="tiny", messages=USER, max_tokens=20)
        assert r.choices[0].message.content == "Plain answer."
        assert h.tok.decode(h.sampler.seen_prompts[-1], skip_special_tokens=False).endswith("assistant\n")
    finally:
        h.close()
