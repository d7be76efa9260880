"""CUDA-graph capture and replay of decode steps, and the start-up warm-up of prefill shapes.

`CudaGraphRunner` captures model forward + compute_logits of a decode batch (one token per
sequence on top of a cached prefix) for a set of batch sizes, into graphs that share one memory
pool, after running each size once eagerly (Triton compiles and autotunes a shape on its first
call, which must not happen inside a capture). A decode step of B sequences replays the smallest
graph of size >= B: the real rows' inputs are copied into the static buffers; padded rows get
state slot -1 and KV slot -1 (every kernel skips negative slots, so they read and write no
sequence's state and no KV block) and context 0. `warmup_prefill` runs cached prefill batches of
every batch-size class once, with the same negative slots, so no request pays compilation.
`VerifyGraphRunner` does the same for the speculative verify forward: B sequences of q = k + 1
tokens each (last token + k drafts) with per-position DeltaNet state slots, returning the hidden
states and the logits of every position.
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


def capture_graphs(sizes: list[int], forward, device) -> tuple[dict, dict]:
    """Warm up and capture `forward(b)` for every size, largest first (the shared pool then fits
    the rest) -> ({b: graph}, {b: forward's static outputs})."""
    graphs, outputs, pool = {}, {}, None
    for b in reversed(sizes):
        forward(b)  # compiles / autotunes this shape outside the capture
        torch.cuda.synchronize(device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            outputs[b] = forward(b)
        pool = g.pool()
        graphs[b] = g
    torch.cuda.synchronize(device)
    return graphs, outputs


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
        self._reset_inputs(0)
        self.graphs, self.logits = capture_graphs(self.sizes, self._forward, self.device)
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


class VerifyGraphRunner:
    """CUDA graphs of the MTP verify forward (spec_decode.SpecDecoder._verify): every sequence runs
    q tokens [last, d_1..d_{q-1}] on its cached prefix and keeps the DeltaNet state after position
    j in per_token_state_slots. Padded rows: state slots, per-position slots and KV slots -1,
    context 0 (nothing written, nothing of theirs read)."""

    def __init__(self, model: torch.nn.Module, cache: ModelCache, max_blocks_per_seq: int,
                 max_batch: int, tokens_per_seq: int, batch_sizes: list[int] | None = None):
        self.model = model
        self.cache = cache
        self.q = q = tokens_per_seq
        self.sizes = sorted(batch_sizes or graph_batch_sizes(max_batch))
        n = self.max_batch = self.sizes[-1]
        dev = self.device = next(model.parameters()).device
        # static inputs: [n * q] per token, [n] per sequence
        self.input_ids = torch.zeros(n * q, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n * q, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n * q,), -1, dtype=torch.long, device=dev)
        self.token_slots = torch.full((n * q,), -1, dtype=torch.long, device=dev)
        self.state_slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.context_lens = torch.zeros(n, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.long, device=dev)
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.long, device=dev) * q
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # (hidden [b*q, H], logits [b*q, V])

    def _batch(self, b: int) -> ForwardBatch:
        T = b * self.q
        fb = ForwardBatch(cu_seqlens=self.cu_seqlens[:b + 1], seq_lens=[self.q] * b, context_lens=[1] * b,
                          cache=self.cache, block_tables=self.block_tables[:b], slot_mapping=self.slot_mapping[:T],
                          state_slots=self.state_slots[:b], per_token_state_slots=self.token_slots[:T])
        # per-step tensors the layers read: the static buffer (no host copy inside the capture)
        fb.__dict__["context_lens_tensor"] = self.context_lens[:b]
        return fb

    def _forward(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = b * self.q
        hidden = self.model(self.input_ids[:T], self.positions[:T], self._batch(b))
        return hidden, self.model.compute_logits(hidden)

    def _reset_inputs(self, start: int) -> None:
        """Sequences from `start` on become padding."""
        t = start * self.q
        self.state_slots[start:].fill_(-1)
        self.context_lens[start:].zero_()
        self.slot_mapping[t:].fill_(-1)
        self.token_slots[t:].fill_(-1)
        self.positions[t:].zero_()
        self.input_ids[t:].zero_()

    @torch.inference_mode()
    def capture(self) -> None:
        self._reset_inputs(0)
        self.graphs, self.outputs = capture_graphs(self.sizes, self._forward, self.device)
        logger.info("captured verify CUDA graphs (%d tokens per sequence) for batch sizes %s", self.q, self.sizes)

    def can_run(self, batch: ForwardBatch) -> bool:
        return (batch.cache is self.cache and batch.per_token_state_slots is not None
                and 0 < batch.num_seqs <= self.max_batch and all(n == self.q for n in batch.seq_lens)
                and all(c > 0 for c in batch.context_lens))

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden [B*q, H], logits [B*q, V] float32): views of the graph's outputs, valid until
        the next replay."""
        B = batch.num_seqs
        T = B * self.q
        b = next(s for s in self.sizes if s >= B)
        self.input_ids[:T].copy_(input_ids)
        self.positions[:T].copy_(positions)
        self.slot_mapping[:T].copy_(batch.slot_mapping)
        self.token_slots[:T].copy_(batch.per_token_state_slots)
        self.state_slots[:B].copy_(batch.state_slots)
        self.context_lens[:B].copy_(batch.context_lens_tensor)
        self.block_tables[:B, :batch.block_tables.shape[1]].copy_(batch.block_tables)
        if b > B:
            self._reset_inputs(B)
        self.graphs[b].replay()
        hidden, logits = self.outputs[b]
        return hidden[:T], logits[:T]
