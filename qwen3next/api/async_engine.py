"""The engine stepping in its own thread while the HTTP side (asyncio) stays responsive.

One background thread owns the `LLMEngine`: it applies queued commands (add / abort), calls
`step()` while work is pending, and hands each `RequestOutput` to the asyncio queue of its request
(`loop.call_soon_threadsafe`). Nothing else touches the engine, so the engine needs no locks.
Admission is bounded: more than `max_running + max_waiting` live sequences -> 503 + Retry-After.
Leaving `generate()` early (client gone, stop string, error) aborts the request and frees its cache.
This is the in-process mode (`serve --no-engine-process`, tests); `engine_client.ProcessEngine` keeps
this front half and moves the engine into a child process.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass

from qwen3next.api.errors import APIError

log = logging.getLogger("qwen3next.api")


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    num_seqs: int


class AsyncEngine:
    def __init__(self, engine, max_running: int, max_waiting: int):
        self.engine = engine
        self.capacity = max_running + max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._live_seqs = 0  # sequences admitted and not finished (guarded by _lock)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.dead: BaseException | None = None
        self.snapshot: dict = {"running": 0, "waiting": 0, "cache_usage": 0.0}
        self._thread = threading.Thread(target=self._run, name="qwen3next-engine", daemon=True)

    # ---- lifecycle ----
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Abort whatever is still running and stop the thread."""
        for rid in list(self._streams):
            self.abort(rid)
        self._stop.set()
        self._commands.put(("wake",))
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)

    @property
    def num_live_requests(self) -> int:
        return len(self._streams)

    # ---- the asyncio side ----
    def generate(self, request_id: str, prompt_token_ids: list[int], params,
                 reserved: bool = False) -> "RequestIterator":
        """Admit the request now (503 when full) and return the async iterator of its RequestOutputs.

        The request reaches the engine when iteration starts; `aclose()` (or leaving early, or
        garbage collection) before it finished aborts it and returns its capacity. `reserved`: the
        caller already holds admission for these sequences (a continuation), skip the bound.
        """
        if self.dead is not None:
            raise APIError(f"the engine has stopped: {self.dead}", 503)
        n = getattr(params, "n", 1)
        with self._lock:
            if request_id in self._streams:
                raise APIError(f"request_id {request_id!r} is already in use", 400, "request_id")
            if n > self.capacity:  # could never be admitted: a client error, not "retry later"
                raise APIError(f"n={n} exceeds what this server runs at once ({self.capacity} sequences)",
                               400, "n")
            if not reserved and self._live_seqs + n > self.capacity:
                raise APIError("The server is at capacity (waiting queue full); retry shortly.", 503,
                               headers={"Retry-After": "1"})
            self._live_seqs += n
            stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), n)
            self._streams[request_id] = stream
        return RequestIterator(self, request_id, stream, ("add", request_id, prompt_token_ids, params))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stop_sample(self, request_id: str, index: int, stop_reason) -> None:
        """One sample hit a stop string (found above the engine): finish it and free its cache."""
        self._commands.put(("stop_sample", request_id, index, stop_reason))

    def fail_all(self, error: BaseException) -> None:
        """Abort every open request and hand each its `error` (server shutdown)."""
        self._commands.put(("fail_all", error))

    # ---- the engine thread ----
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                busy = self.engine.has_unfinished_requests()
                try:
                    # block only when idle; otherwise just drain what arrived since the last step
                    cmd = self._commands.get(block=not busy, timeout=None if not busy else 0)
                    self._apply(cmd)
                    while True:
                        self._apply(self._commands.get_nowait())
                except queue.Empty:
                    pass
                if self._stop.is_set():
                    break
                if self.engine.has_unfinished_requests():
                    self._deliver_step(self.engine.step())
                self._update_snapshot()
        except BaseException as e:  # the engine is broken: fail every open request, /health -> 503
            log.exception("engine loop died")
            self.dead = e
            err = EngineDeadError(f"engine error: {e}")
            for rid in list(self._streams):
                self._deliver(rid, err, True)

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, rid, ids, params = cmd
            if rid not in self._streams:  # aborted before it was added
                return
            try:
                self.engine.add_request(rid, ids, params)
            except ValueError as e:
                self._deliver(rid, APIError(str(e), 400), True)
            except Exception as e:  # one bad request must not stop the loop for everyone
                log.exception("add_request failed")
                self._deliver(rid, APIError(f"could not start the request: {e}", 500), True)
        elif cmd[0] == "stop_sample":
            if cmd[1] in self._streams:
                self.engine.stop_sequence(*cmd[1:])
        elif cmd[0] == "fail_all":
            for rid in list(self._streams):
                self.engine.abort_request(rid)
                self._deliver(rid, cmd[1], True)
        elif cmd[0] == "abort":
            rid = cmd[1]
            if rid in self._streams:
                self.engine.abort_request(rid)
                self._release(rid)

    def _deliver(self, rid: str, item, final: bool) -> None:
        stream = self._streams.get(rid)
        if stream is None:
            return
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        if final:
            self._release(rid)

    def _deliver_step(self, outs) -> None:
        """A step's outputs with one event-loop wake-up per loop, not one per request: each
        call_soon_threadsafe writes to the loop's self-pipe (at 128 streams those writes were ~3%
        of the engine thread, and each woke the loop again)."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            batches.setdefault(stream.loop, []).append((stream.queue, out))
            if out.finished:
                self._release(out.request_id)
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _release(self, rid: str) -> None:
        with self._lock:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                self._live_seqs -= stream.num_seqs

    def _update_snapshot(self) -> None:
        self.snapshot = snapshot_of(self.engine.stats)


def snapshot_of(s: dict) -> dict:
    """The engine's stats plus the three figures the /metrics gauges read."""
    blocks = s["kv_blocks_used"] / max(1, s["kv_blocks_total"])
    slots = s["state_slots_used"] / max(1, s["state_slots_total"])
    return {"running": s["num_requests_running"], "waiting": s["num_requests_waiting"],
            "cache_usage": max(blocks, slots), **s}


def _put_all(items) -> None:
    for queue_, item in items:
        queue_.put_nowait(item)


class RequestIterator:
    """Async iterator over one request's outputs; closing it early aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream, add_cmd: tuple):
        self._engine = engine
        self.request_id = request_id
        self._stream = stream
        self._add_cmd = add_cmd
        self._started = False
        self._closed = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._closed:
            raise StopAsyncIteration
        if not self._started:
            self._started = True
            self._engine._commands.put(self._add_cmd)
        try:
            item = await self._stream.queue.get()
        except BaseException:  # cancelled (client gone): give the request up
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            self._closed = True
            raise item
        if item.finished:
            self._closed = True
        return item

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            # also right when never started: the abort only releases the admission slot then
            self._engine.abort(self.request_id)

    def __del__(self):
        if not self._closed:
            self._closed = True
            self._engine.abort(self.request_id)
