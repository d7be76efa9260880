"""Turns a SchedulerOutput into one model forward and one sampling call.

Builds the flat batch (input ids, positions, cu_seqlens, context lengths, state slots, block
tables gathered from the cache manager's persistent per-slot table, slot mapping computed on the
device), runs the model, takes the logits of each sequence whose tokens are all computed after
this step (a decode, or the last chunk of a prompt) and samples them. A parent of an n > 1 request
that finishes its prompt brings one logits row per sample (its FORK siblings share the row).
Prompt chunks of requests that asked for prompt logprobs also send their hidden rows through the
lm_head (prompt_logprobs.collect); other rows never do.
"""

from __future__ import annotations

import torch

from qwen3next.engine import prompt_logprobs
from qwen3next.engine.cache import CacheManager
from qwen3next.engine.sampler import Sampler, SamplerOutput
from qwen3next.engine.scheduler import SchedulerOutput
from qwen3next.engine.sequence import Sequence
from qwen3next.engine.spec_batch import pack


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: CacheManager, sampler: Sampler,
                 device: torch.device):
        self.model = model
        self.cache = cache
        self.sampler = sampler
        self.device = device
        # CUDA-graph decode (engine/cuda_graph.py), set by LLMEngine on CUDA; None: always eager
        self.graphs = None
        # request id -> prompt logprob entries so far (the engine's dict, shared)
        self.prompt_lps: dict[str, list] = {}

    def build_batch(self, sched: SchedulerOutput):
        """-> (input_ids [T], positions [T], ForwardBatch, logit rows [R], row sequences,
        prompt-logprob spans [(seq, first position, flat start, flat stop)])."""
        seqs = sched.seqs
        if all(n == 1 and not s.children and s.num_computed_tokens + 1 == len(s.token_ids)
               for s, n in zip(seqs, sched.num_new_tokens)):  # every sequence decodes one token
            runs = [(s, len(s.token_ids) - 1, s.token_ids[-1:]) for s in seqs]
            input_ids, positions, batch = pack(self.cache, self.device, runs)
            return input_ids, positions, batch, list(range(len(seqs))), list(seqs), []
        runs: list[tuple[Sequence, int, list[int]]] = []
        rows: list[Sequence] = []
        row_idx: list[int] = []
        spans = []
        end = 0
        for seq, n in zip(seqs, sched.num_new_tokens):
            c = seq.num_computed_tokens
            runs.append((seq, c, seq.token_ids[c:c + n]))
            if self.prompt_lps and (sp := prompt_logprobs.span(seq, c, n, self.prompt_lps)):
                spans.append((seq, sp[0], end + sp[0] - c, end + sp[1] - c))
            end += n
            if c + n == seq.num_tokens:  # all its tokens computed: sample the next one
                rows.append(seq)
                row_idx.append(end - 1)
                for child in seq.children:
                    rows.append(child)
                    row_idx.append(end - 1)
        input_ids, positions, batch = pack(self.cache, self.device, runs)
        return input_ids, positions, batch, row_idx, rows, spans

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run one step; -> (the sequences sampled, in row order, and their samples). Prompt
        logprob entries of the step are appended to `prompt_lps`."""
        input_ids, positions, batch, row_idx, rows, spans = self.build_batch(sched)
        # (a 1-token prompt chunk can look like a decode: the graph gives no hidden rows)
        if self.graphs is not None and not spans and self.graphs.can_run(batch):
            logits = self.graphs.run(input_ids, positions, batch)  # [B, V], row i = sequence i
            if not rows:
                return rows, None
            if row_idx != list(range(batch.num_seqs)):  # n > 1 forks, or a recompute mid-way
                logits = logits[torch.tensor(row_idx, dtype=torch.long, device=self.device)]
            return rows, self.sampler(logits, rows)
        hidden = self.model(input_ids, positions, batch)  # [T, H]
        if spans:
            prompt_logprobs.collect(self.model, [(seq, p0, hidden[a:b]) for seq, p0, a, b in spans],
                                    self.prompt_lps)
        if not rows:
            return rows, None
        if row_idx != list(range(len(input_ids))):  # not a plain decode: pick the rows sampled
            hidden = hidden[torch.tensor(row_idx, dtype=torch.long, device=self.device)]
        logits = self.model.compute_logits(hidden)  # [R, V] float32
        return rows, self.sampler(logits, rows)
