"""Rank 0's side: the model the engine drives, mirrored on the workers.

`DriverModel` wraps rank 0's shard and follows the model contract (docs/structure.md); each
forward / compute_logits first sends the same call to the workers, so the engine (scheduler,
runner, sampler, profiling) runs unchanged on rank 0 and sampling happens on rank 0 only.
`make_cache_manager` gives every rank a cache of the same plan (each holds its heads' shards);
`TPCacheManager` queues the copies an n > 1 fork makes, replayed by the workers before the next
forward. `shutdown` stops the workers and leaves the group.
"""

from __future__ import annotations

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
        messages.send(("forward", (input_ids.cpu(), positions.cpu(), messages.pack_batch(batch), copies)))
        return self.inner(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        messages.send(("logits", hidden.cpu()))
        return self.inner.compute_logits(hidden)

    def make_cache_manager(self, spec, plan, dtype, *args, **kwargs) -> TPCacheManager:
        """Rank 0's CacheManager; the workers allocate caches of the same plan from their specs."""
        messages.send(("cache", (plan, dtype)))
        return TPCacheManager(self, spec, plan, dtype, *args, **kwargs)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Tell the workers to stop, wait for them (kill after timeout_s), leave the group."""
        if self._stopped:
            return
        self._stopped = True
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
