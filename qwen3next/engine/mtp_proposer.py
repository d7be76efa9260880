"""The MTP draft model (architecture.md §8.2): keeps the MTP layer's KV cache in step with the
trunk and proposes up to k draft tokens per sequence.

Catch-up: for every position t the trunk computed (and kept) this step, run the MTP on the pair
(trunk hidden h_t, token x_{t+1}) at position t; its KV lands in the MTP layer's own paged cache
(same blocks as the trunk) and the output at the last position gives draft 1. Draft j >= 2 feeds
(d_{j-1}, the MTP's previous output) at the next position. Drafts are sampled with the request's
own rules (penalties, min_tokens, temperature, top-k/p, min-p; argmax when greedy) and their
distributions kept for rejection sampling. Results go to `seq.spec_token_ids` / `spec_draft_probs`.
The catch-up asks the head only for the rows that draft (`mtp(..., rows=)`); plain-greedy drafts
on CPU come from one C++ call for the catch-up and all k draft steps (`Qwen3NextMTP.draft_greedy`).
Rows under a structured-output grammar draft step by step, each step masked by the grammar after
the drafts before it (the matchers are rolled back afterwards).
"""

from __future__ import annotations

import torch

from qwen3next.engine.cache import CacheManager
from qwen3next.engine.rejection_sampler import adjusted_logits, draw, final_probs, race
from qwen3next.engine.sampler import argmax_rows
from qwen3next.engine.sequence import Sequence
from qwen3next.engine.spec_batch import pack
from qwen3next.mtp import Qwen3NextMTP


class MTPProposer:
    def __init__(self, model: torch.nn.Module, cache: CacheManager, generator: torch.Generator,
                 device: torch.device, num_speculative_tokens: int):
        if model.mtp is None:
            raise ValueError("speculative_config: the model has no MTP head (mtp.* weights)")
        self.model = model
        self.cache = cache
        self.generator = generator
        self.device = device
        self.k = num_speculative_tokens
        # the head itself takes `rows` (skipping the work for the others); a TP proxy does not
        self._rows_ok = isinstance(model.mtp, Qwen3NextMTP)
        # structured_output.StructuredOutputs (set by SpecDecoder): grammar rows' drafts are masked
        self.structured = None

    def _mtp(self, ids, hidden, pos, batch, rows: list[int] | None) -> torch.Tensor:
        """The MTP forward -> outputs of `rows` (None: all)."""
        if rows is None:
            return self.model.mtp(ids, hidden, pos, batch)
        if self._rows_ok:
            return self.model.mtp(ids, hidden, pos, batch, rows=rows)
        return self.model.mtp(ids, hidden, pos, batch)[torch.tensor(rows, dtype=torch.long, device=self.device)]

    @torch.inference_mode()
    def run(self, entries: list[tuple[Sequence, int, int, bool]], hidden: torch.Tensor) -> None:
        """entries: (seq, first position c, positions kept n, wants drafts); hidden [sum n, H] are
        the trunk's outputs at those positions, in order. Each seq's tokens c+1..c+n are known."""
        if not entries:
            return
        want = [i for i, e in enumerate(entries) if e[3]]
        ends, end = [], -1  # flat index of each entry's last position
        for e in entries:
            end += e[2]
            ends.append(end)
        seqs = [entries[i][0] for i in want]
        # drafts per sequence: the verify forward writes positions num_computed..+k, all inside
        # max_len - 1 (the cache never holds the last token); draft steps need KV up to +k-2
        ks = []
        for s in seqs:
            k = max(0, min(self.k, s.request.max_len - 1 - s.num_tokens))
            if k > 1 and not self.cache.grow(s, k - 1):
                k = 1
            ks.append(k)
            s.spec_token_ids, s.spec_draft_probs = [], None
        live = [i for i, k in enumerate(ks) if k > 0]
        # (after grow: the block tables gathered here also cover the draft steps' positions)
        runs = [(s, c, s.token_ids[c + 1:c + 1 + n]) for s, c, n, _ in entries]
        ids, pos, batch = pack(self.cache, self.device, runs)
        # the catch-up's output is needed only at the last position of each sequence that drafts
        rows = [ends[want[i]] for i in live]
        so = self.structured
        grammar = {i: m for i in live if so is not None and so.rows and (m := so.active_matcher(seqs[i])) is not None}
        if not grammar and self._greedy_in_one_call(ids, hidden, pos, batch, rows, [seqs[i] for i in live],
                                                     [ks[i] for i in live]):
            return
        y = self._mtp(ids, hidden, pos, batch, None if len(rows) == len(hidden) else rows)  # [L, H]
        probs: dict[int, list[torch.Tensor]] = {}
        took = dict.fromkeys(grammar, 0)  # drafts each grammar row's matcher consumed
        try:
            for j in range(1, self.k + 1):
                if not live:
                    break
                if j > 1:
                    runs = [(seqs[i], seqs[i].num_computed_tokens + j - 2, [seqs[i].spec_token_ids[-1]]) for i in live]
                    ids, pos, batch = pack(self.cache, self.device, runs)
                    y = self.model.mtp(ids, y, pos, batch)
                logits = self.model.compute_logits(y)  # [L, V]
                if grammar:  # each grammar row: what its grammar allows after its drafts so far
                    logits = so.mask(logits, [seqs[i] for i in live])
                toks, p = self._sample(logits, [seqs[i] for i in live])
                for r, i in enumerate(live):
                    seqs[i].spec_token_ids.append(toks[r])
                    if p[r] is not None:
                        probs.setdefault(i, []).append(p[r])
                    if i in grammar and ks[i] > j:
                        # the matcher follows the drafts; a complete grammar (or a draft it cannot
                        # take, e.g. a stop token) ends the row's drafting
                        if grammar[i].try_consume_tokens([toks[r]]) == 1:
                            took[i] += 1
                        if took[i] < j or grammar[i].is_stopped():
                            ks[i] = j
                keep = [r for r, i in enumerate(live) if ks[i] > j]
                if len(keep) < len(live):
                    y = y[torch.tensor(keep, dtype=torch.long, device=self.device)]
                live = [live[r] for r in keep]
        finally:
            for i, n in took.items():
                if n:
                    grammar[i].rollback(n)
        for i, ps in probs.items():
            seqs[i].spec_draft_probs = torch.stack(ps)  # [k, V]

    def _greedy_in_one_call(self, ids, hidden, pos, batch, rows, seqs: list[Sequence], ks: list[int]) -> bool:
        """Plain greedy drafts by this class's own rule: the catch-up and all k draft steps as one
        C++ call (Qwen3NextMTP.draft_greedy), the same drafts as step by step. False: not taken."""
        if (not rows or not self._rows_ok or getattr(self._sample, "__func__", None) is not _OWN_SAMPLE
                or not all(s.request.plain_greedy for s in seqs)):
            return False
        bs = self.cache.block_size
        # draft j >= 2 of a sequence sits at position num_computed + j - 2 (as the step-by-step loop)
        dpos, dslot = [], []
        for s, k in zip(seqs, ks):
            c = s.num_computed_tokens
            ps = [c + j - 2 for j in range(2, self.k + 1)]
            dpos.append(ps)
            dslot.append([s.block_ids[p // bs] * bs + p % bs if j < k else -1 for j, p in enumerate(ps, 1)])
        drafts = self.model.mtp.draft_greedy(ids, hidden, pos, batch, rows, dpos, dslot)
        if drafts is None:
            return False
        for s, d in zip(seqs, drafts):
            s.spec_token_ids = d
        return True

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list]:
        """One draft per row, as if the row's earlier drafts were already in the sequence."""
        if all(s.request.plain_greedy for s in seqs):
            return argmax_rows(logits).tolist(), [None] * len(seqs)
        x = adjusted_logits(logits, seqs, [s.spec_token_ids for s in seqs])
        toks = x.argmax(-1)
        probs: list = [None] * len(seqs)
        rand = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rand:
            rs = [seqs[i] for i in rand]
            p = final_probs(x[torch.tensor(rand, device=x.device)], rs)
            toks[torch.tensor(rand, device=x.device)] = race(p, draw("exp", len(rs), p.shape[1], rs,
                                                                      self.generator, x.device))
            for r, i in enumerate(rand):
                probs[i] = p[r]
        return toks.tolist(), probs


_OWN_SAMPLE = MTPProposer._sample  # (a replaced `_sample`, e.g. a test's drafter, turns the one-call path off)
