"""`ProcessEngine`: the AsyncEngine front (admission, streams, abort) over an engine in a child process.

Like vLLM V1's EngineCore: the child (`engine_process.main`, spawn context: forking a process that
holds torch threads is unsafe) owns the LLMEngine and steps it on its own core; this process keeps
HTTP, templates, tokenising and detokenising, so the GIL no longer puts both on one core. Commands
go out through a sender thread (the event loop never blocks on a full pipe); each step comes back
as one message read by the event loop itself (`add_reader`), whose outputs go straight to the
requests' queues. If the child dies, every open request fails with EngineDeadError and /health
answers 503; `shutdown()` stops the child (killing it if it does not stop in time).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time

from qwen3next.api import engine_process
from qwen3next.api.async_engine import AsyncEngine, EngineDeadError, snapshot_of
from qwen3next.api.errors import APIError

log = logging.getLogger("qwen3next.api")


class EngineStartError(RuntimeError):
    pass


class ProcessEngine(AsyncEngine):
    def __init__(self, options: dict, max_waiting: int, start_timeout: float = 1800.0):
        """Spawn the engine process and wait until its model is loaded (its error re-raised here)."""
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        # not a daemon: tensor-parallel workers are children of the engine process
        self.proc = ctx.Process(target=engine_process.main, name="qwen3next-engine",
                                args=(child, options, logging.getLogger().getEffectiveLevel()))
        self.proc.start()
        child.close()  # only the child holds its end: its death reads as EOF here
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        try:
            msg = self._conn.recv() if self._conn.poll(start_timeout) else ("error", "engine start timed out")
        except EOFError:
            self.proc.join(5)
            msg = ("error", f"the engine process exited during startup (exit code {self.proc.exitcode})")
        except BaseException:  # Ctrl-C while the model loads: don't leave the child loading it
            self.proc.kill()
            self.proc.join()
            raise
        if msg[0] != "ready":
            self._stop_child(5.0)
            raise EngineStartError(msg[1])
        self.info = msg[1]
        super().__init__(None, self.info["max_num_seqs"], max_waiting)  # its thread runs _run below
        self.snapshot = snapshot_of(self.info["stats"])

    # ---- lifecycle ----
    def start(self) -> None:
        """Call from the serving event loop: it reads the engine's messages."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._conn.fileno(), self._on_readable)
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Abort what still runs, stop the child (idempotent; also without start()). Call it on the
        serving loop's thread, or after that loop stopped."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        if self._thread.is_alive():
            for rid in list(self._streams):
                self.abort(rid)
            self._stop.set()
            self._commands.put(("wake",))  # the sender sends ("stop",) on its way out
        else:
            self._send(("stop",))
        # keep reading: a child blocked on a full pipe would never see the stop
        deadline = time.monotonic() + timeout
        while self.proc.is_alive() and time.monotonic() < deadline:
            try:
                if self._conn.poll(0.05):
                    self._conn.recv()
            except (EOFError, OSError):
                break
        if self._thread.ident is not None:  # started (a failed build_state never starts it)
            self._thread.join(1.0)
        self._stop_child(1.0)
        self._conn.close()

    def _stop_child(self, timeout: float) -> None:
        self.proc.join(timeout)
        if self.proc.is_alive():
            log.warning("the engine process did not stop in time: killing it")
            self.proc.kill()
            self.proc.join(5)

    # ---- the sender thread: queued commands -> the child ----
    def _run(self) -> None:
        while True:
            cmd = self._commands.get()
            if self._stop.is_set():
                self._send(("stop",))
                return
            op = cmd[0]
            if op == "add":
                if cmd[1] in self._streams:  # else aborted before it was added
                    self._send(cmd)
            elif op == "abort":
                if cmd[1] in self._streams:
                    self._send(cmd)
                    self._release(cmd[1])  # its later "abort" output finds no stream: dropped
            elif op == "stop_sample":
                if cmd[1] in self._streams:
                    self._send(cmd)
            elif op == "fail_all":
                for rid in list(self._streams):
                    self._send(("abort", rid))
                    self._deliver(rid, cmd[1], True)

    def _send(self, msg: tuple) -> None:
        try:
            self._conn.send(msg)
        except (OSError, ValueError):  # the child is gone (the reader reports it)
            pass

    # ---- the event loop: the child's messages -> the requests' queues ----
    def _on_readable(self) -> None:
        try:
            for _ in range(16):  # then let the streams run; the reader is called again if more came
                self._handle(self._conn.recv())
                if not self._conn.poll():
                    break
        except (EOFError, OSError):
            self._loop.remove_reader(self._conn.fileno())
            if not self._closed:
                self.proc.join(1)
                self._died(f"the engine process exited (exit code {self.proc.exitcode})")

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "dead":
            self._died(msg[1])
            return
        _, outputs, events, stats = msg
        for _, rid, status, text in events:
            self._deliver(rid, APIError(text, status), True)
        for item in outputs:
            stream = self._streams.get(item[0])
            if stream is None:
                continue
            out = engine_process.decode_output(item)
            if stream.loop is self._loop:
                stream.queue.put_nowait(out)
            else:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
            if out.finished:
                self._release(out.request_id)
        self.snapshot = snapshot_of(stats)

    def _died(self, why: str) -> None:
        log.error("engine process died: %s", why)
        self.dead = RuntimeError(why)
        err = EngineDeadError(f"engine error: {why}")
        for rid in list(self._streams):
            self._deliver(rid, err, True)
