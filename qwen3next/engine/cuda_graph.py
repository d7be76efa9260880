"""CUDA-graph capture and replay of decode steps, and the start-up warm-up of prefill shapes.

`CudaGraphRunner` captures model forward + compute_logits of a decode batch (one token per
sequence on top of a cached prefix) for a set of batch sizes, into graphs that share one memory
pool, after running each size once eagerly (Triton compiles and autotunes a shape on its first
call, which must not happen inside a capture). A decode step of B sequences replays the smallest
graph of size >= B: the real rows' inputs are copied into the static buffers; padded rows get
state slot -1 and KV slot -1 (every kernel skips negative slots, so they read and write no
sequence's state and no KV block) and context 0. `warmup_prefill` runs cached prefill batches of
every batch-size class once, with the same negative slots, so no request pays compilation.
"""

from __future__ import annotations

import logging

import torch

from qwen3next.forward_batch import ForwardBatch, ModelCache

logger = logging.getLogger("qwen3next.engine")


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 (vLLM-like), up to and including max_batch."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += range(16, max_batch, 16)
    return sorted(set(sizes) | {max_batch})


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, cache: ModelCache, max_blocks_per_seq: int,
                 max_batch: int, batch_sizes: list[int] | None = None):
        """Allocates the static buffers; `capture()` records the graphs."""
        self.model = model
        self.cache = cache
        self.sizes = sorted(batch_sizes or graph_batch_sizes(max_batch))
        n = self.max_batch = self.sizes[-1]
        dev = next(model.parameters()).device
        self.device = dev
        # static inputs, [max_batch] (padded rows: slot -1, context 0, position 0)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)  # = context lens in decode
        self.state_slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.long, device=dev)
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # static outputs [b, V] float32

    # ---- decode ---------------------------------------------------------------------------------
    def _batch(self, b: int) -> ForwardBatch:
        fb = ForwardBatch(cu_seqlens=self.cu_seqlens[:b + 1], seq_lens=[1] * b, context_lens=[1] * b,
                          cache=self.cache, block_tables=self.block_tables[:b],
                          slot_mapping=self.slot_mapping[:b], state_slots=self.state_slots[:b])
        # the layers read context lengths from this (cached) property: point it at the static buffer
        fb.__dict__["context_lens_tensor"] = self.positions[:b]
        return fb

    def _forward(self, b: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:b], self.positions[:b], self._batch(b))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every size, largest first (the shared pool then fits the rest)."""
        self._reset_inputs(0)
        pool = None
        for b in reversed(self.sizes):
            self._forward(b)  # compiles / autotunes this shape outside the capture
            torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.logits[b] = self._forward(b)
            pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def _reset_inputs(self, start: int) -> None:
        """Rows from `start` on become padding: they touch no state slot and no KV block."""
        self.state_slots[start:].fill_(-1)
        self.slot_mapping[start:].fill_(-1)
        self.positions[start:].zero_()
        self.input_ids[start:].zero_()

    def can_run(self, batch: ForwardBatch) -> bool:
        return (batch.cache is self.cache and batch.per_token_state_slots is None
                and 0 < batch.num_seqs <= self.max_batch and batch.is_decode)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """A decode batch of B sequences -> logits [B, V] float32 (a view of the graph's output,
        valid until the next replay)."""
        B = batch.num_seqs
        b = next(s for s in self.sizes if s >= B)
        self.input_ids[:B].copy_(input_ids)
        self.positions[:B].copy_(positions)
        self.state_slots[:B].copy_(batch.state_slots)
        self.slot_mapping[:B].copy_(batch.slot_mapping)
        # columns past the batch's own width hold stale ids: never read (positions < context + 1)
        self.block_tables[:B, :batch.block_tables.shape[1]].copy_(batch.block_tables)
        if b > B:
            self._reset_inputs(B)
        self.graphs[b].replay()
        return self.logits[b][:B]

    # ---- prefill warm-up -------------------------------------------------------------------------
    @torch.inference_mode()
    def warmup_prefill(self, max_num_seqs: int, max_num_batched_tokens: int, tokens_per_seq: int = 17) -> None:
        """One cached prefill per power-of-two batch size up to max_num_seqs (the Triton kernels
        specialise on the next power of two of B), nothing written: slots -1."""
        dev, bs = self.device, self.cache.block_size
        B = 1
        while True:
            n = max(1, min(tokens_per_seq, max_num_batched_tokens // B))
            T = B * n
            cu = torch.arange(B + 1, dtype=torch.long, device=dev) * n
            fb = ForwardBatch(cu_seqlens=cu, seq_lens=[n] * B, context_lens=[0] * B, cache=self.cache,
                              block_tables=torch.zeros(B, -(-n // bs), dtype=torch.long, device=dev),
                              slot_mapping=torch.full((T,), -1, dtype=torch.long, device=dev),
                              state_slots=torch.full((B,), -1, dtype=torch.long, device=dev))
            pos = torch.arange(n, device=dev).repeat(B)
            hidden = self.model(torch.zeros(T, dtype=torch.long, device=dev), pos, fb)
            self.model.compute_logits(hidden[cu[1:] - 1])
            if B >= max_num_seqs:
                break
            B = min(2 * B, max_num_seqs)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
