"""The serving benchmark's load: concurrent streaming chat completions through the openai client.

`run_load(url, model, concurrency, num_requests, max_tokens)` sends `num_requests` distinct chat
prompts, at most `concurrency` in flight, each streaming exactly `max_tokens` tokens (ignore_eos),
and returns aggregate output tokens/s, TTFT and inter-token latency percentiles. Token counts come
from the server's usage chunk; inter-token gaps are the gaps between content chunks.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

WORDS = ("cat river house morning fish water sun weather city number story answer question model "
         "token word sentence language").split()


def prompt(i: int) -> str:
    """A distinct short user message per request (no shared prefix beyond the chat template)."""
    picks = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8))
    return f"Request {i}: write a long story about the {picks}."


@dataclass
class RequestStats:
    ttft: float = 0.0  # seconds from send to the first content chunk
    latency: float = 0.0  # seconds from send to the end of the stream
    tokens: int = 0  # completion tokens (usage)
    gaps: list[float] = field(default_factory=list)  # seconds between content chunks


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank-interpolated percentile (p in [0, 100]); 0.0 for no data."""
    if not xs:
        return 0.0
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def one_request(client, model: str, i: int, max_tokens: int) -> RequestStats:
    st = RequestStats()
    t0 = time.perf_counter()
    last = None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt(i)}], max_tokens=max_tokens,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            st.tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        text = (d.content or "") + (getattr(d, "reasoning_content", None) or "")
        if not text:
            continue
        if last is None:
            st.ttft = now - t0
        else:
            st.gaps.append(now - last)
        last = now
    st.latency = time.perf_counter() - t0
    return st


async def _run(url: str, model: str, concurrency: int, num_requests: int, max_tokens: int,
               offset: int) -> tuple[list[RequestStats], float]:
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600,
                           http_client=httpx.AsyncClient(limits=limits, timeout=600)) as client:
        sem = asyncio.Semaphore(concurrency)

        async def bounded(i: int) -> RequestStats:
            async with sem:
                return await one_request(client, model, offset + i, max_tokens)

        t0 = time.perf_counter()
        stats = await asyncio.gather(*(bounded(i) for i in range(num_requests)))
        return list(stats), time.perf_counter() - t0


def run_load(url: str, model: str, concurrency: int, num_requests: int, max_tokens: int,
             offset: int = 0) -> dict:
    """One load run -> summary dict (seconds for latencies, tokens/s for rates)."""
    stats, wall = asyncio.run(_run(url, model, concurrency, num_requests, max_tokens, offset))
    short = [s for s in stats if s.tokens != max_tokens]
    if short:
        raise RuntimeError(f"{len(short)} of {num_requests} requests returned {short[0].tokens} tokens, "
                           f"not {max_tokens} (is ignore_eos honoured?)")
    tokens = sum(s.tokens for s in stats)
    ttft = [s.ttft for s in stats]
    gaps = [g for s in stats for g in s.gaps]
    # per-stream decode rate: tokens after the first over the time after the first
    stream_rate = [(s.tokens - 1) / (s.latency - s.ttft) for s in stats if s.latency > s.ttft]
    return {
        "concurrency": concurrency, "requests": num_requests, "output_tokens": tokens, "wall_s": wall,
        "tok_per_s": tokens / wall, "per_stream_tok_per_s": statistics.median(stream_rate),
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99),
    }  # fmt: skip
