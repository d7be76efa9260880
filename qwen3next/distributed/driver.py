"""Rank 0's side: the model the engine drives, mirrored on the workers.

`DriverModel` wraps rank 0's shard and follows the model contract (docs/structure.md); each
forward / compute_logits first sends the same call to the workers, so the engine (scheduler,
runner, sampler, profiling) runs unchanged on rank 0 and sampling happens on rank 0 only.
`make_cache_manager` gives every rank a cache of the same plan (each holds its heads' shards);
`TPCacheManager` queues the copies an n > 1 fork makes, replayed by the workers before the next
forward. `shutdown` stops the workers and leaves the group.
"""

from __future__ import annotations

import atexit
import time

import torch
from torch import nn

from qwen3next.engine.cache import CacheManager
from qwen3next.forward_batch import ForwardBatch

from . import messages
from .parallel_state import destroy_tp


class TPCacheManager(CacheManager):
    def __init__(self, driver: "DriverModel", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._driver = driver

    def fork(self, parent, child) -> bool:
        if not super().fork(parent, child):
            return False
        n = parent.num_computed_tokens
        copies = self._driver.pending_copies
        if n % self.block_size:  # the partial last block was copied (CacheManager.fork)
            last = self.blocks_needed(n) - 1
            copies.append(("block", parent.block_ids[last], child.block_ids[last]))
        copies.append(("slot", parent.slot, child.slot))
        return True


class DriverModel(nn.Module):
    def __init__(self, model: nn.Module, workers: list):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.mtp = None  # speculative decoding is refused under tensor parallelism (args.py)
        self.workers = workers  # multiprocessing.Process of ranks 1..N-1
        self.pending_copies: list[tuple[str, int, int]] = []
        self._stopped = False

    def state_spec(self):
        return self.inner.state_spec()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch):
        copies, self.pending_copies = self.pending_copies, []
        self._send(("forward", (input_ids.cpu(), positions.cpu(), messages.pack_batch(batch), copies)))
        return self._checked(self.inner, input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self._send(("logits", hidden.cpu()))
        return self._checked(self.inner.compute_logits, hidden)

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

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Tell the workers to stop, wait for them (kill after timeout_s), leave the group."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.shutdown)  # drop the reference that kept the model alive
        alive = all(p.is_alive() for p in self.workers)
        if alive:
            try:
                messages.send(("stop", None))
            except Exception:  # noqa: BLE001 - a worker already gone: kill the rest below
                pass
        for p in self.workers:
            p.join(timeout_s if alive else 0)
            if p.is_alive():
                p.kill()
                p.join()
        destroy_tp()
