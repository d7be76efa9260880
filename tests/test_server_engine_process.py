"""`qwen3next serve` with the engine in its own process (the CPU default): the API process only sees
token ids and the stats that come with each step. Checks streaming + logprobs across the process
boundary, abort on disconnect freeing the cache, 503 from the bounded queue, /metrics (incl. the
MTP per-position counts, a structured request under MTP), a dying engine process failing open requests (no hang) and /health,
one-line startup errors, and SIGTERM stopping both processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
import uvicorn  # noqa: E402

from qwen3next.api.server import build_app, build_state  # noqa: E402
from qwen3next.cli import build_parser  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER = [{"role": "user", "content": "hi"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcServer:
    """build_state + app exactly as `serve --engine-process`, uvicorn in a thread."""

    def __init__(self, ckpt: str, *args: str):
        ns = build_parser().parse_args(["serve", "--model", ckpt, "--engine-process", "--served-model-name",
                                        "tiny", *args])
        self.state = build_state(ns)
        self.engine = self.state.engine
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(build_app(self.state), host="127.0.0.1", port=port,
                                                    log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "test server did not start"
            time.sleep(0.02)

    def chat(self, **kw) -> httpx.Response:
        return httpx.post(self.url + "/v1/chat/completions", json={"model": "tiny", "messages": USER, **kw},
                          timeout=30)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.engine.snapshot
            if (self.engine.num_live_requests == 0 and s["kv_blocks_used"] == 0 and s["state_slots_used"] == 0
                    and s["running"] == 0 and s["waiting"] == 0):
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.engine.proc.is_alive()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from tests.helpers.checkpoints import make_tiny_checkpoint

    # a long context: 8000-token requests are still running (seconds) when the test looks
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("long_ckpt"), with_mtp=False, max_position_embeddings=8192)
    s = ProcServer(ckpt, "--max-num-seqs", "2", "--max-waiting", "0")
    yield s
    s.close()


def test_runs_in_a_child_and_streams_with_logprobs(srv):
    assert srv.engine.proc.is_alive() and srv.engine.proc.pid != os.getpid()
    r = srv.chat(max_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=2, seed=1)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"
    lps = body["choices"][0]["logprobs"]["content"]
    assert len(lps) == 5 and all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in lps)
    with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": USER, "max_tokens": 7, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}) as s:
        lines = [x for x in s.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 7
    assert srv.wait_idle()
    text = httpx.get(srv.url + "/metrics").text
    assert 'qwen3next:generation_tokens_total{model_name="tiny"} 12.0' in text
    assert "qwen3next:kv_cache_usage_perc" in text
    assert "spec_decode_num_accepted_tokens_per_pos" not in text  # speculative decoding is off
    # logit_bias crosses the process boundary inside SamplingParams
    picked = []
    for tok in ("7", "9"):
        r = srv.chat(max_tokens=3, ignore_eos=True, temperature=0, logprobs=True, logit_bias={tok: 100})
        assert r.status_code == 200, r.text
        picked.append({e["token"] for e in r.json()["choices"][0]["logprobs"]["content"]})
    assert all(len(p) == 1 for p in picked) and picked[0] != picked[1]


def test_disconnect_aborts_and_bounded_queue_503(srv):
    body = {"model": "tiny", "messages": USER, "max_tokens": 8000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", srv.url + "/v1/chat/completions", json=body) as a, \
                c.stream("POST", srv.url + "/v1/chat/completions", json=body) as b:
            lines = a.iter_lines(), b.iter_lines()  # kept: a dropped iterator closes its response
            for it in lines:
                next(it)
            assert srv.engine.num_live_requests == 2
            r = srv.chat(max_tokens=2)  # capacity: 2 running + 0 waiting
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
    # both clients left mid-stream: the engine process aborted them and freed their cache
    assert srv.wait_idle(), srv.engine.snapshot
    assert srv.chat(max_tokens=2).status_code == 200


def test_spec_decode_stats_cross_the_process_and_engine_death(tiny_ckpt):
    s = ProcServer(tiny_ckpt, "--max-num-seqs", "2",
                   "--speculative-config", '{"method": "qwen3_next_mtp", "num_speculative_tokens": 2}')
    try:
        assert s.engine.info["speculative"]
        r = s.chat(max_tokens=24, ignore_eos=True, seed=3)
        assert r.json()["usage"]["completion_tokens"] == 24
        assert s.wait_idle()
        spec = s.engine.snapshot["spec_decode"]
        text = httpx.get(s.url + "/metrics").text
        for pos in range(2):
            line = f'qwen3next:spec_decode_num_accepted_tokens_per_pos_total{{model_name="tiny",position="{pos}"}}'
            assert f"{line} {float(spec['accepted_per_pos'][pos])}" in text
        assert spec["num_verifies"] > 0 and sum(spec["accepted_per_pos"]) == spec["num_accepted_tokens"]
        assert f'qwen3next:spec_decode_num_drafts_total{{model_name="tiny"}} {float(spec["num_verifies"])}' in text
        # structured outputs with speculative decoding (drafts verified under the grammar), after </think>
        end = s.state.tokenizer.token_to_id("</think>")
        r = s.chat(max_tokens=200, n=2, temperature=1.0, seed=1, logit_bias={str(end): 100}, guided_json=_SCHEMA)
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            assert json.loads(choice["message"]["content"])["n"] in range(10)

        # the engine process dies mid-stream: the stream ends with an error event, no hang
        events = []
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=30, json={
                "model": "tiny", "messages": USER, "max_tokens": 400, "ignore_eos": True, "stream": True}) as st:
            for line in st.iter_lines():
                if line:
                    events.append(line)
                    if len(events) == 2:
                        s.engine.proc.kill()
        assert events[-1] == "data: [DONE]" and "engine" in json.loads(events[-2][6:])["error"]["message"]
        assert httpx.get(s.url + "/health").status_code == 503
        assert s.chat(max_tokens=2).status_code == 503
    finally:
        s.close()


def test_bad_model_is_one_line_error():
    r = subprocess.run([sys.executable, "-m", "qwen3next", "serve", "--model", "/nonexistent/model",
                        "--engine-process", "--port", str(free_port())],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_sigterm_stops_both_processes(tiny_ckpt):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwen3next", "serve", "--model", tiny_ckpt, "--port", str(port),
                             "--engine-process", "--shutdown-timeout", "0.3", "--log-level", "warning"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == proc.pid]
        assert children, "no engine process"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        # no orphan left behind (multiprocessing's resource tracker exits just after its parent)
        deadline = time.time() + 10
        while any(_ppid(pid) is not None for pid in children) and time.time() < deadline:
            time.sleep(0.1)
        assert all(_ppid(pid) is None for pid in children), "a child outlived the server"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[1])


def test_same_answers_as_the_engine_thread(tiny_ckpt):
    """Seeded requests through the process boundary = through the in-process engine: n samples,
    logprobs, a stop string found above the engine (stop_sample), prompt lists, forced tool calls."""
    from tests.helpers.server_harness import ServerHarness

    thread = ServerHarness(tiny_ckpt, "--served-model-name", "tiny")
    proc = ProcServer(tiny_ckpt)
    try:
        def both(path: str, body: dict) -> tuple[dict, dict]:
            out = []
            for url in (thread.url, proc.url):
                r = httpx.post(url + path, json={"model": "tiny", "seed": 7, **body}, timeout=60)
                assert r.status_code == 200, r.text
                j = r.json()
                j.pop("id"), j.pop("created")
                out.append(_rounded(j))
            return out[0], out[1]

        chat = {"messages": USER, "max_tokens": 12, "ignore_eos": True, "n": 2, "logprobs": True, "top_logprobs": 1}
        a, b = both("/v1/chat/completions", chat)
        assert a == b
        text = a["choices"][0]["message"]["content"] or a["choices"][0]["message"].get("reasoning_content") or ""
        assert len(text) > 4, a  # random weights: 12 tokens of mostly printable bytes
        # a stop string that sample 0 is sure to hit: found above the engine, which stops that sample
        a, b = both("/v1/chat/completions", {**chat, "stop": [text[3:5]]})
        assert a == b and a["choices"][0]["finish_reason"] == "stop"
        a, b = both("/v1/completions", {"prompt": ["Hello", "Hi there"], "max_tokens": 6, "ignore_eos": True,
                                         "echo": True, "logprobs": 2})
        assert a == b and len(a["choices"]) == 2
        a, b = both("/v1/chat/completions", {**chat, "n": 1, "prompt_logprobs": 1})
        assert a == b and a["prompt_logprobs"][0] is None and len(a["prompt_logprobs"][1]) >= 1
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        a, b = both("/v1/chat/completions", {"messages": USER, "max_tokens": 20, "tools": tools,
                                             "tool_choice": "required"})
        assert a == b
        # structured outputs: the engine process builds its own grammar matchers (after </think>)
        end = proc.state.tokenizer.token_to_id("</think>")
        a, b = both("/v1/chat/completions", {"messages": USER, "max_tokens": 200, "n": 2, "temperature": 1.0,
                                             "logit_bias": {str(end): 100}, "guided_json": _SCHEMA})
        assert a == b
        for choice in a["choices"]:
            assert json.loads(choice["message"]["content"])["n"] in range(10)
        assert thread.wait_idle() and proc.wait_idle()
    finally:
        thread.close()
        proc.close()


_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
           "required": ["n"], "additionalProperties": False}


def _rounded(x):
    """Floats to 4 places: the two engines' logprobs may differ in float32's last bits."""
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


def test_engine_flags_reach_the_child(tiny_ckpt):
    """Every engine flag of `serve` crosses to the engine process: prefix caching on, a repeated
    prompt reports the reused tokens (the child once dropped --enable-prefix-caching silently)."""
    from qwen3next.api.engine_process import ENGINE_OPTIONS
    from qwen3next.engine.args import EngineArgs

    ns = build_parser().parse_args(["serve", "--model", tiny_ckpt])
    flags = {k for k in vars(ns) if k in EngineArgs.names()}
    assert flags <= set(ENGINE_OPTIONS), flags - set(ENGINE_OPTIONS)
    proc = ProcServer(tiny_ckpt, "--enable-prefix-caching", "--prefix-caching-state-block", "96")
    try:
        body = {"model": "tiny", "prompt": list(range(5, 305)), "max_tokens": 2, "temperature": 0}
        for want in (None, {"cached_tokens": 288}):
            r = httpx.post(proc.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["usage"].get("prompt_tokens_details") == want
        assert proc.wait_idle()
    finally:
        proc.close()
