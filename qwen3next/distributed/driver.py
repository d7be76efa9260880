"""Rank 0's side: the model the engine drives, mirrored on the workers.

`DriverModel` wraps rank 0's shard and follows the model contract (docs/structure.md); each
forward / compute_logits first sends the same call to the workers, so the engine (scheduler,
runner, sampler, profiling) runs unchanged on rank 0 and sampling happens on rank 0 only.
`make_cache_manager` gives every rank a cache of the same plan (each holds its heads' shards);
`TPCacheManager` queues the cache copies rank 0's engine makes outside a forward (n > 1 forks,
speculative rollback), replayed by the workers before the next forward. `mtp` mirrors the MTP
head the same way; `graph_runner` gives the engine decode CUDA graphs captured on every rank
(graphs.py). `shutdown` stops the workers and leaves the group; so does dropping the last
reference to the driver (`del llm; gc.collect()`, as with vLLM) and interpreter exit. On GPUs a
watcher thread aborts the NCCL communicator when a worker dies: rank 0 may be blocked on a
collective whose peer is gone (NCCL kernels spin, unlike gloo's closed socket), and the abort
turns that into an error naming the rank instead of a hang until the collective timeout.
"""

from __future__ import annotations

import threading
import time
import weakref

import torch
from torch import nn

from qwen3next.engine.cache import CacheManager
from qwen3next.forward_batch import ForwardBatch

from . import messages
from .parallel_state import abort_device_group, destroy_tp


class TPCacheManager(CacheManager):
    def __init__(self, driver: "DriverModel", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._driver = driver

    def fork(self, parent, child, **kw) -> bool:
        if not super().fork(parent, child, **kw):
            return False
        n = parent.num_computed_tokens
        if n % self.block_size or kw.get("copy_last"):  # the last block was copied (CacheManager.fork)
            last = self.blocks_needed(n) - 1
            self._driver.pending_copies.append(("block", parent.block_ids[last], child.block_ids[last]))
        self._driver.pending_copies.append(("slots", [parent.slot], [child.slot]))
        return True

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        super().copy_slots(src, dst)
        self._driver.pending_copies.append(("slots", list(src), list(dst)))


class _MTPProxy:
    """`driver.mtp`: the MTP head's calls, mirrored on the workers (not a module: no parameters)."""

    def __init__(self, driver: "DriverModel"):
        self._driver = driver
        self.layers = driver.inner.mtp.layers

    def __call__(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                 batch: ForwardBatch) -> torch.Tensor:
        d = self._driver
        d._send(("mtp", (next_ids.cpu(), hidden.cpu(), positions.cpu(), messages.pack_batch(batch), d._take())))
        return d._checked(d.inner.mtp, next_ids, hidden, positions, batch)


class DriverModel(nn.Module):
    def __init__(self, model: nn.Module, workers: list):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.mtp = _MTPProxy(self) if model.mtp is not None else None
        self.workers = workers  # multiprocessing.Process of ranks 1..N-1
        self.pending_copies: list[tuple[str, int, int]] = []
        # not atexit.register(self.shutdown): that strong reference kept a deleted LLM's workers
        # and group alive, so a second tensor-parallel LLM in the process could never start
        stopping = threading.Event()  # set by stop_workers: deaths after it are expected
        self._finalizer = weakref.finalize(self, stop_workers, workers, stopping)
        if next(model.parameters()).device.type == "cuda":
            threading.Thread(target=_abort_when_a_worker_dies, args=(workers, stopping),
                             name="tp-worker-watch", daemon=True).start()

    def state_spec(self):
        return self.inner.state_spec()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch):
        self._send(("forward", (input_ids.cpu(), positions.cpu(), messages.pack_batch(batch), self._take())))
        return self._checked(self.inner, input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self._send(("logits", hidden.cpu()))
        return self._checked(self.inner.compute_logits, hidden)

    def _take(self) -> list:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def _send(self, msg: tuple) -> None:
        self._checked(messages.send, msg)

    def _checked(self, fn, *args):
        """fn(*args); a failure while a worker is dead names that rank (the collective's own
        error says only that a peer closed its connection)."""
        try:
            return fn(*args)
        except Exception as e:
            deadline = time.monotonic() + 2.0  # a killed worker may not be reaped yet
            for p in self.workers:
                p.join(max(deadline - time.monotonic(), 0))
            dead = [(r, p.exitcode) for r, p in enumerate(self.workers, start=1) if not p.is_alive()]
            if dead:
                raise RuntimeError(f"tensor-parallel rank {dead[0][0]} is gone (exit code {dead[0][1]})") from e
            raise

    def make_cache_manager(self, spec, plan, dtype, *args, **kwargs) -> TPCacheManager:
        """Rank 0's CacheManager; the workers allocate caches of the same plan from their specs."""
        messages.send(("cache", (plan, dtype)))
        return TPCacheManager(self, spec, plan, dtype, *args, **kwargs)

    def graph_runner(self, cache, max_blocks_per_seq: int, max_batch: int):
        """The engine's decode CUDA graphs, captured and replayed on every rank in step."""
        from .graphs import TPGraphRunner

        return TPGraphRunner(self, cache, max_blocks_per_seq, max_batch)

    def shutdown(self) -> None:
        """Stop the workers and leave the group (idempotent)."""
        self._finalizer()


def _abort_when_a_worker_dies(workers: list, stopping: threading.Event, poll_s: float = 0.2) -> None:
    while not stopping.wait(poll_s):
        if any(not p.is_alive() for p in workers):
            if not stopping.is_set():
                abort_device_group()
            return


def stop_workers(workers: list, stopping: threading.Event | None = None, timeout_s: float = 10.0) -> None:
    """Tell the workers to stop, wait for them (kill after timeout_s), leave the group."""
    if stopping is not None:
        stopping.set()
    if all(p.is_alive() for p in workers):
        # in a thread: a worker stuck in a collective (rank 0 failed mid-forward) never
        # receives, and killing it below is what ends the send
        threading.Thread(target=_send_stop, name="tp-stop", daemon=True).start()
    else:  # no stop can reach them (the broadcast needs every rank): the rest are killed now
        timeout_s = 0.0
    deadline = time.monotonic() + timeout_s
    for p in workers:
        p.join(max(deadline - time.monotonic(), 0))
        if p.is_alive():
            p.kill()
            p.join()
    destroy_tp()


def _send_stop() -> None:
    try:
        messages.send(("stop", None))
    except Exception:  # noqa: BLE001 - a worker already gone: stop_workers kills the rest
        pass
