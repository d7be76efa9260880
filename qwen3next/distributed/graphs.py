"""CUDA-graph decode steps under tensor parallelism.

Every rank captures the same decode graphs (engine/cuda_graph.py's CudaGraphRunner over its own
shard and cache), in the same order, so the all-reduces / all-gathers recorded inside them pair
up across ranks: NCCL kernels in a graph are replayed like any other. Rank 0's `TPGraphRunner`
tells the workers to capture ("graphs") and, for each step, to load the same inputs and replay
the same graph ("replay"); the prefill warm-up goes through the DriverModel, which mirrors it.
"""

from __future__ import annotations

import torch

from qwen3next.engine.cuda_graph import CudaGraphRunner
from qwen3next.forward_batch import ForwardBatch

from . import messages


class TPGraphRunner(CudaGraphRunner):
    def __init__(self, driver, cache, max_blocks_per_seq: int, max_batch: int,
                 batch_sizes: list[int] | None = None):
        # self.model = the driver: warmup_prefill's eager forwards are mirrored on the workers
        super().__init__(driver, cache, max_blocks_per_seq, max_batch, batch_sizes)
        self.driver = driver

    def _forward(self, b: int) -> torch.Tensor:
        """This rank's shard only: the workers run theirs in step (capture() told them to)."""
        inner = self.driver.inner
        return inner.compute_logits(inner(self.input_ids[:b], self.positions[:b], self._batch(b)))

    def capture(self) -> None:
        d = self.driver
        d._send(("graphs", (self.block_tables.shape[1], list(self.sizes))))
        d._checked(super().capture)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        d = self.driver
        d._send(("replay", (input_ids.cpu(), positions.cpu(), messages.pack_batch(batch), d._take())))
        return d._checked(super().run, input_ids, positions, batch)
