"""A real qwen3next server on loopback for tests, with a scripted sampler (TESTS ONLY).

`ServerHarness(ckpt, *serve_args)` builds the state exactly as `qwen3next serve` does, wraps the
engine's sampler so that a request can be made to "emit" a scripted token sequence (a random tiny
model only emits garbage), and runs uvicorn in a thread on a free port. Scripts are consumed one
per engine request in arrival order (`push`), or `sticky` for every request; requests without a
script sample normally. After the script the sequence emits EOS.
"""

from __future__ import annotations

import collections
import socket
import threading
import time

import uvicorn

from qwen3next.api.server import build_app, build_state
from qwen3next.cli import build_parser


class ScriptedSampler:
    def __init__(self, real, eos_id: int):
        self.real = real
        self.eos_id = eos_id
        self.queue: collections.deque[list[int]] = collections.deque()
        self.sticky: list[int] | None = None
        self._assigned: dict[str, list[int] | None] = {}
        self.seen_prompts: list[list[int]] = []
        # seconds slept per sampling call: keeps "slow request" tests independent of engine speed
        self.delay = 0.0

    def __call__(self, logits, rows):
        if self.delay:
            time.sleep(self.delay)
        out = self.real(logits, rows)
        for i, seq in enumerate(rows):
            rid = seq.request.request_id
            if rid not in self._assigned:
                self._assigned[rid] = self.queue.popleft() if self.queue else self.sticky
                self.seen_prompts.append(list(seq.request.prompt_token_ids))
            script = self._assigned[rid]
            if script is not None:
                k = seq.num_output_tokens
                out.token_ids[i] = script[k] if k < len(script) else self.eos_id
        return out


class ServerHarness:
    def __init__(self, ckpt: str, *serve_args: str):
        # the engine in this process (its thread): the scripted sampler must reach into it
        ns = build_parser().parse_args(["serve", "--model", ckpt, "--no-engine-process", *serve_args])
        self.state = build_state(ns)
        self.engine = self.state.engine.engine
        self.tok = self.state.tokenizer
        eos = min(self.state.eos_ids) if self.state.eos_ids else self.tok.eos_token_id
        self.sampler = ScriptedSampler(self.engine.runner.sampler, eos)
        self.engine.runner.sampler = self.sampler
        self.aborted: list[str] = []  # request ids the server aborted (client gone, stop string)
        real_abort = self.engine.abort_request

        def abort(request_id):
            self.aborted.append(request_id)
            real_abort(request_id)

        self.engine.abort_request = abort
        self.app = build_app(self.state)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    def ids(self, *pieces: str) -> list[int]:
        """Token ids of the pieces, each encoded separately (so a tag can be cut across tokens)."""
        return [t for p in pieces for t in self.tok.encode(p)]

    def push(self, *pieces: str) -> None:
        self.sampler.queue.append(self.ids(*pieces))

    def cache_is_free(self) -> bool:
        s = self.engine.stats
        return s["kv_blocks_used"] == 0 and s["state_slots_used"] == 0 and not self.engine.requests

    def wait_idle(self, timeout: float = 10.0) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.cache_is_free() and self.state.engine.num_live_requests == 0:
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
