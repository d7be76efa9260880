"""Turns a SchedulerOutput into one model forward and one sampling call.

Builds the flat batch (input ids, positions, cu_seqlens, context lengths, state slots, block
tables gathered from the cache manager's persistent per-slot table, slot mapping computed on the
device), runs the model, takes the logits of each sequence whose tokens are all computed after
this step (a decode, or the last chunk of a prompt) and samples them. A parent of an n > 1 request
that finishes its prompt brings one logits row per sample (its FORK siblings share the row).
"""

from __future__ import annotations

import torch

from qwen3next.engine.cache import CacheManager
from qwen3next.engine.sampler import Sampler, SamplerOutput
from qwen3next.engine.scheduler import SchedulerOutput
from qwen3next.engine.sequence import Sequence
from qwen3next.forward_batch import ForwardBatch


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: CacheManager, sampler: Sampler,
                 device: torch.device):
        self.model = model
        self.cache = cache
        self.sampler = sampler
        self.device = device
        self.block_size = cache.block_size
        # CUDA-graph decode (engine/cuda_graph.py), set by LLMEngine on CUDA; None: always eager
        self.graphs = None

    def build_batch(self, sched: SchedulerOutput):
        """-> (input_ids [T], positions [T], ForwardBatch, logit rows [R], row sequences)."""
        ids: list[int] = []
        pos: list[int] = []
        ctx: list[int] = []
        slots: list[int] = []
        rows: list[Sequence] = []
        row_idx: list[int] = []
        end = 0
        max_blocks = 1
        for seq, n in zip(sched.seqs, sched.num_new_tokens):
            c = seq.num_computed_tokens
            if n == 1:
                ids.append(seq.token_ids[c])
                pos.append(c)
            else:
                ids += seq.token_ids[c:c + n]
                pos += range(c, c + n)
            ctx.append(c)
            slots.append(seq.slot)
            end += n
            max_blocks = max(max_blocks, len(seq.block_ids))
            if c + n == seq.num_tokens:  # all its tokens computed: sample the next one
                rows.append(seq)
                row_idx.append(end - 1)
                for child in seq.children:
                    rows.append(child)
                    row_idx.append(end - 1)
        dev = self.device
        lens = list(sched.num_new_tokens)
        host = torch.tensor([ids, pos], dtype=torch.long)
        meta = torch.tensor(lens + slots, dtype=torch.long)
        if dev.type != "cpu":
            host, meta = host.to(dev, non_blocking=True), meta.to(dev, non_blocking=True)
        input_ids, positions = host[0], host[1]
        B = len(lens)
        seq_lens_t, slots_t = meta[:B], meta[B:]
        cu = torch.zeros(B + 1, dtype=torch.long, device=dev)
        torch.cumsum(seq_lens_t, 0, out=cu[1:])
        tables = self.cache.block_tables[slots_t, :max_blocks]  # [B, max_blocks]
        # slot of each new token: its sequence's block at position // block_size
        row_of_tok = torch.repeat_interleave(torch.arange(B, device=dev), seq_lens_t, output_size=len(ids))
        blk = tables[row_of_tok, positions // self.block_size]
        slot_mapping = blk * self.block_size + positions % self.block_size
        batch = ForwardBatch(
            cu_seqlens=cu, seq_lens=lens, context_lens=ctx, cache=self.cache.cache,
            block_tables=tables, slot_mapping=slot_mapping, state_slots=slots_t,
        )
        return input_ids, positions, batch, row_idx, rows

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run one step; -> (the sequences sampled, in row order, and their samples)."""
        input_ids, positions, batch, row_idx, rows = self.build_batch(sched)
        if self.graphs is not None and self.graphs.can_run(batch):
            logits = self.graphs.run(input_ids, positions, batch)  # [B, V], row i = sequence i
            if not rows:
                return rows, None
            if row_idx != list(range(batch.num_seqs)):  # n > 1 forks, or a recompute mid-way
                logits = logits[torch.tensor(row_idx, dtype=torch.long, device=self.device)]
            return rows, self.sampler(logits, rows)
        hidden = self.model(input_ids, positions, batch)  # [T, H]
        if not rows:
            return rows, None
        idx = torch.tensor(row_idx, dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden[idx])  # [R, V] float32
        return rows, self.sampler(logits, rows)
