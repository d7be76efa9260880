"""Prometheus metrics of one server (openai_api.md §7), in a registry of its own.

Counters and histograms are fed by the serving layer as requests progress (`RequestTimer`); the
gauges (running, waiting, cache use) and the speculative-decoding figures read the async engine's
latest snapshot when scraped (with the engine in its own process, the snapshot is the stats that
came with its last step). Names follow vLLM's with the `qwen3next:` prefix, all labelled
`model_name`; the MTP counts per draft position carry a `position` label (0 = first draft token);
prefix caching adds prefix_cache_queries / prefix_cache_hits (tokens).
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, snapshot: Callable[[], dict]):
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        lab = ["model_name"]
        self.http_requests = Counter("qwen3next:http_requests", "HTTP requests by endpoint and status",
                                     lab + ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("qwen3next:prompt_tokens", "Prefill tokens processed", lab, registry=r)
        self.generation_tokens = Counter("qwen3next:generation_tokens", "Tokens generated", lab, registry=r)
        self.request_success = Counter("qwen3next:request_success", "Finished requests by reason",
                                       lab + ["finished_reason"], registry=r)
        self.ttft = Histogram("qwen3next:time_to_first_token_seconds", "Time to first token", lab,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("qwen3next:inter_token_latency_seconds", "Time between output tokens", lab,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("qwen3next:e2e_request_latency_seconds", "Request latency, arrival to finish",
                             lab, buckets=_LATENCY_BUCKETS, registry=r)
        self.req_prompt = Histogram("qwen3next:request_prompt_tokens", "Prompt length per request", lab,
                                    buckets=_TOKEN_BUCKETS, registry=r)
        self.req_gen = Histogram("qwen3next:request_generation_tokens", "Output length per request",
                                 lab, buckets=_TOKEN_BUCKETS, registry=r)
        for name, key, doc in [
            ("num_requests_running", "running", "Sequences being decoded"),
            ("num_requests_waiting", "waiting", "Sequences waiting to be scheduled"),
            ("kv_cache_usage_perc", "cache_usage", "Fraction of KV blocks / state slots in use (0..1)"),
        ]:
            g = Gauge(f"qwen3next:{name}", doc, lab, registry=r)
            g.labels(model_name).set_function(lambda k=key: float(snapshot().get(k, 0.0)))
        for name, key, doc in [
            ("spec_decode_acceptance_rate", "acceptance_rate", "Accepted / drafted tokens (MTP)"),
            ("spec_decode_mean_accepted_length", "mean_accepted_length", "Tokens gained per verify step"),
        ]:
            g = Gauge(f"qwen3next:{name}", doc, lab, registry=r)
            g.labels(model_name).set_function(
                lambda k=key: float((snapshot().get("spec_decode") or {}).get(k, 0.0)))
        r.register(SpecDecodeCollector(model_name, snapshot))
        r.register(PrefixCacheCollector(model_name, snapshot))

        # the labelled children the per-token path uses, looked up once
        self.ttft_m, self.itl_m = self.ttft.labels(model_name), self.itl.labels(model_name)
        self.generation_tokens_m = self.generation_tokens.labels(model_name)

    def count_http(self, endpoint: str, status: int) -> None:
        self.http_requests.labels(self.model_name, endpoint, str(status)).inc()

    def timer(self, prompt_tokens: int) -> "RequestTimer":
        return RequestTimer(self, prompt_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineStatsCollector:
    """A prometheus collector reading one section of the engine's stats snapshot at scrape time."""

    def __init__(self, model_name: str, snapshot: Callable[[], dict]):
        self.model_name = model_name
        self.snapshot = snapshot


class SpecDecodeCollector(_EngineStatsCollector):
    """The engine's cumulative MTP counts (vLLM's spec_decode_* names), overall and per draft
    position; nothing when speculative decoding is off."""

    def collect(self):
        spec = self.snapshot().get("spec_decode")
        if not spec:
            return
        name = self.model_name
        for metric, key, doc in [
            ("num_drafts", "num_verifies", "Verify steps that checked at least one draft token"),
            ("num_draft_tokens", "num_draft_tokens", "Draft tokens proposed by the MTP head"),
            ("num_accepted_tokens", "num_accepted_tokens", "Draft tokens accepted by the target"),
        ]:
            c = CounterMetricFamily(f"qwen3next:spec_decode_{metric}", doc, labels=["model_name"])
            c.add_metric([name], spec[key])
            yield c
        per_pos = [
            (CounterMetricFamily, "num_accepted_tokens_per_pos", "accepted_per_pos",
             "Draft tokens accepted at each draft position"),
            (CounterMetricFamily, "num_draft_tokens_per_pos", "drafted_per_pos",
             "Draft tokens proposed at each draft position"),
            (GaugeMetricFamily, "acceptance_rate_per_pos", "acceptance_rate_per_pos",
             "Accepted / drafted at each draft position (since start)"),
        ]
        for family, metric, key, doc in per_pos:
            m = family(f"qwen3next:spec_decode_{metric}", doc, labels=["model_name", "position"])
            for pos, value in enumerate(spec[key]):
                m.add_metric([name, str(pos)], value)
            yield m


class PrefixCacheCollector(_EngineStatsCollector):
    """vLLM's prefix_cache_queries / prefix_cache_hits (prompt tokens looked up / reused, since
    start); nothing when prefix caching is off."""

    def collect(self):
        pc = self.snapshot().get("prefix_cache")
        if not pc:
            return
        for metric, key, doc in [("queries", "queried_tokens", "Prompt tokens looked up in the prefix cache"),
                                 ("hits", "hit_tokens", "Prompt tokens reused from the prefix cache")]:
            c = CounterMetricFamily(f"qwen3next:prefix_cache_{metric}", doc, labels=["model_name"])
            c.add_metric([self.model_name], pc[key])
            yield c


class RequestTimer:
    """Latency bookkeeping of one sequence (one choice): call `token(n)` per output, `finish` once."""

    def __init__(self, metrics: Metrics, prompt_tokens: int):
        self.m = metrics
        self.start = self.last = time.perf_counter()
        self.generated = 0
        self.prompt_tokens = prompt_tokens
        self.ttft: float | None = None
        self.itls: list[float] = []
        self.m.prompt_tokens.labels(metrics.model_name).inc(prompt_tokens)

    def token(self, n: int) -> None:
        if n <= 0:
            return
        t = time.perf_counter()
        if self.ttft is None:
            self.ttft = t - self.start
            self.m.ttft_m.observe(self.ttft)
        else:
            # several tokens in one step (speculative decoding) share the gap
            gap = (t - self.last) / n
            for _ in range(n):
                self.itls.append(gap)
                self.m.itl_m.observe(gap)
        self.last = t
        self.generated += n
        self.m.generation_tokens_m.inc(n)

    def finish(self, reason: str) -> None:
        name = self.m.model_name
        self.m.e2e.labels(name).observe(time.perf_counter() - self.start)
        self.m.req_prompt.labels(name).observe(self.prompt_tokens)
        self.m.req_gen.labels(name).observe(self.generated)
        self.m.request_success.labels(name, reason).inc()
