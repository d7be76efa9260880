"""Load test of the OpenAI server: N concurrent streaming clients for a bounded time.

Every request must complete or end with a clean error (an HTTP error in the OpenAI envelope, or an
SSE error event followed by [DONE]); a fraction of clients hang up mid-stream on purpose. Afterwards
no request may still run and no cache block or state slot may be held. Reports p50/p99 time to
first token and inter-token latency, tokens/s, and the outcome counts; exits 1 on any failure.

  python benchmarks/bench_server_load.py --model DIR --clients 16 --duration 20
  python benchmarks/bench_server_load.py --url http://host:8000 --served-model-name NAME
  python benchmarks/bench_server_load.py --tiny          # a random tiny checkpoint (CI smoke)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Stats:
    def __init__(self):
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.tokens = 0
        self.outcomes: dict[str, int] = {}
        self.failures: list[str] = []
        self.health: list[float] = []  # /health latency under load: is the HTTP side responsive?

    def count(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1


async def one_request(client: httpx.AsyncClient, url: str, model: str, max_tokens: int,
                      hang_up: bool, stats: Stats) -> None:
    body = {"model": model, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": random.choice(["Hi", "Tell me a story.", "2+2?"])}]}
    t0 = time.perf_counter()
    last = None
    got_done = False
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            data = json.loads(await r.aread())
            if "error" in data and r.status_code in (400, 429, 503):
                stats.count(f"http_{r.status_code}")
                # a polite client backs off (Retry-After is in seconds; scaled down for the test)
                await asyncio.sleep(0.1 * float(r.headers.get("retry-after", 1)) * (1 + random.random()))
            else:
                stats.failures.append(f"HTTP {r.status_code} without an error envelope: {data}")
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                got_done = True
                break
            event = json.loads(payload)
            if "error" in event:
                stats.count("sse_error")
                continue
            delta = event["choices"][0]["delta"] if event["choices"] else {}
            if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
                now = time.perf_counter()
                if last is None:
                    stats.ttft.append(now - t0)
                else:
                    stats.itl.append(now - last)
                last = now
                stats.tokens += 1
                if hang_up and stats.tokens % 3 == 0:
                    stats.count("hung_up")
                    return  # leaving the context closes the connection mid-stream
    if got_done:
        stats.count("completed")
    else:
        stats.failures.append("stream ended without [DONE]")


async def client_loop(url, model, max_tokens, deadline, hang_up_frac, stats):
    async with httpx.AsyncClient(timeout=120) as client:
        while time.perf_counter() < deadline:
            try:
                await one_request(client, url, model, max_tokens, random.random() < hang_up_frac, stats)
            except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
                stats.failures.append(f"{type(e).__name__}: {e}")


async def probe_health(url: str, deadline: float, stats: Stats) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            if (await client.get(url + "/health")).status_code != 200:
                stats.failures.append("/health not 200 under load")
            stats.health.append(time.perf_counter() - t)
            await asyncio.sleep(0.2)


async def scrape(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(url + "/metrics")).text
    out = {}
    for line in text.splitlines():
        if line.startswith("qwen3next:") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run(url: str, model: str, ns) -> Stats:
    stats = Stats()
    deadline = time.perf_counter() + ns.duration
    t0 = time.perf_counter()
    await asyncio.gather(probe_health(url, deadline, stats),
                         *[client_loop(url, model, ns.max_tokens, deadline, ns.hang_up, stats)
                           for _ in range(ns.clients)])
    wall = time.perf_counter() - t0
    # aborted streams are freed by the engine thread shortly after the hang-up
    for _ in range(100):
        m = await scrape(url)
        if m.get("qwen3next:num_requests_running", 0) == 0 and m.get("qwen3next:kv_cache_usage_perc", 0) == 0:
            break
        await asyncio.sleep(0.1)
    else:
        stats.failures.append(f"after the run: running={m.get('qwen3next:num_requests_running')} "
                              f"cache_usage={m.get('qwen3next:kv_cache_usage_perc')} (leak)")
    print(f"{ns.clients} clients, {wall:.1f} s: {stats.outcomes}")
    print(f"TTFT p50 {pct(stats.ttft, .5) * 1e3:.1f} ms  p99 {pct(stats.ttft, .99) * 1e3:.1f} ms  "
          f"| inter-token p50 {pct(stats.itl, .5) * 1e3:.1f} ms  p99 {pct(stats.itl, .99) * 1e3:.1f} ms  "
          f"| {stats.tokens / wall:.1f} deltas/s | /health p99 {pct(stats.health, .99) * 1e3:.1f} ms")
    return stats


def start_local_server(ns):
    """The same server `qwen3next serve` runs, in a thread of this process."""
    import socket
    import threading

    import uvicorn

    from qwen3next.api.server import build_app, build_state
    from qwen3next.cli import build_parser

    model = ns.model
    if ns.tiny:
        from tests.helpers.checkpoints import make_tiny_checkpoint

        model = make_tiny_checkpoint(tempfile.mkdtemp(prefix="bench_tiny_"))
    args = ["serve", "--model", model, "--served-model-name", "bench", "--max-num-seqs", str(ns.max_num_seqs),
            "--max-waiting", str(ns.max_waiting)]
    state = build_state(build_parser().parse_args(args))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, state


def _held(s: dict) -> bool:
    return bool(s["running"] or s["waiting"] or s["kv_blocks_used"] or s["state_slots_used"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="an already running server (else one is started here)")
    p.add_argument("--served-model-name", default="bench")
    p.add_argument("--model", help="model dir for the local server")
    p.add_argument("--tiny", action="store_true", help="local server on a random tiny checkpoint")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--hang-up", type=float, default=0.1, help="fraction of requests abandoned mid-stream")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-waiting", type=int, default=4, help="small, so overload (503) is exercised")
    ns = p.parse_args()
    server = state = None
    url = ns.url
    if url is None:
        if not (ns.model or ns.tiny):
            p.error("give --url, --model DIR or --tiny")
        url, server, state = start_local_server(ns)
    stats = asyncio.run(run(url, ns.served_model_name, ns))
    if state is not None:
        # the engine's latest stats (with the engine in its own process they arrive after its step)
        deadline = time.time() + 5
        while time.time() < deadline and (state.engine.num_live_requests or _held(state.engine.snapshot)):
            time.sleep(0.05)
        if state.engine.num_live_requests or _held(state.engine.snapshot):
            stats.failures.append("engine still holds requests, blocks or slots after the run")
        server.should_exit = True
    for f in stats.failures[:10]:
        print("FAIL:", f)
    print("OK" if not stats.failures else f"{len(stats.failures)} failures")
    return 1 if stats.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
