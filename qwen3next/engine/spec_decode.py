"""MTP speculative decoding: the config, the verify step and its statistics.

`SpeculativeConfig.parse` takes vLLM's `speculative_config` ({"method": "qwen3_next_mtp",
"num_speculative_tokens": k}, as a dict or JSON text). `SpecDecoder.execute` replaces the plain
ModelRunner step: sequences that carry drafts run [last token, d_1..d_k] through the trunk in one
forward (DeltaNet states after every position kept in scratch state slots via
`per_token_state_slots`), the drafts are verified (argmax match for greedy rows, rejection
sampling otherwise), and a sequence that rejected some keeps the conv/recurrent state of its last
accepted position; KV written for rejected positions is simply never counted. Prompt chunks run in
the same forward on CPU (one forward's fixed cost is per-op overhead there), apart on CUDA.
`SpecDecoder.propose` then brings the MTP cache up to date and drafts the next tokens
(mtp_proposer.py). Rows under a structured-output grammar draft under its masks (drafts past
the first one the grammar rejects are dropped); each verify position is masked by the grammar
after the drafts before it, so an invalid draft is rejected (StructuredOutputs.mask_verify).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from qwen3next.engine.cache import CacheManager
from qwen3next.engine.mtp_proposer import MTPProposer
from qwen3next.engine.rejection_sampler import (adjusted_logits, draw, final_probs, rejection_sample,
                                                verify_greedy)
from qwen3next.engine.sampler import Sampler, argmax_rows
from qwen3next.engine.scheduler import SchedulerOutput
from qwen3next.engine.sequence import Sequence
from qwen3next.engine.spec_batch import pack

METHODS = ("qwen3_next_mtp", "mtp")
MAX_SPEC_TOKENS = 4


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    # vLLM's knob: no drafts in a step that runs more sequences than this, and no MTP forward
    # (the catch-up is deferred, so drafting resumes at full quality when the batch shrinks)
    disable_by_batch_size: int | None = None

    @classmethod
    def parse(cls, value) -> "SpeculativeConfig | None":
        """None / {} -> None; a dict or JSON object text -> a checked config (one-line ValueErrors)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {value!r}")
        if not value:
            return None
        known = {"method", "num_speculative_tokens", "disable_by_batch_size"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unsupported keys {unknown} (supported: {sorted(known)})")
        method = value.get("method", "qwen3_next_mtp")
        if method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {list(METHODS)}, got {method!r}")
        k = value.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPEC_TOKENS:
            raise ValueError(f"speculative_config.num_speculative_tokens must be an integer in "
                             f"[1, {MAX_SPEC_TOKENS}], got {k!r}")
        off = value.get("disable_by_batch_size")
        if off is not None and (not isinstance(off, int) or isinstance(off, bool) or off < 1):
            raise ValueError(f"speculative_config.disable_by_batch_size must be a positive integer, got {off!r}")
        return cls("qwen3_next_mtp", k, off)


@dataclass
class SpecStats:
    """Cumulative counts. A 'verify' is one sequence checking >= 1 draft in one step."""

    k: int
    num_verifies: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    drafted_per_pos: list[int] = field(default_factory=list)
    accepted_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.drafted_per_pos = [0] * self.k
        self.accepted_per_pos = [0] * self.k

    def add(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts == 0:
            return
        self.num_verifies += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        for i in range(num_drafts):
            self.drafted_per_pos[i] += 1
            self.accepted_per_pos[i] += i < num_accepted

    def as_dict(self) -> dict:
        v = self.num_verifies
        return {
            "num_speculative_tokens": self.k,
            "num_verifies": v,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "acceptance_rate": self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0,
            # tokens one verify emits: the accepted drafts plus the target's own token
            "mean_accepted_length": 1 + self.num_accepted_tokens / v if v else 0.0,
            "accepted_per_pos": list(self.accepted_per_pos),
            "drafted_per_pos": list(self.drafted_per_pos),
            "acceptance_rate_per_pos": [a / d if d else 0.0
                                        for a, d in zip(self.accepted_per_pos, self.drafted_per_pos)],
        }


@dataclass
class SpecStepOutput:
    computed: list[int]  # per scheduled sequence: positions whose cache entries are now valid
    rows: list[Sequence]  # sequences that got new tokens
    tokens: list[list[int]]  # per row, 1..k+1 tokens
    logprobs: list[list | None]  # per row: one dict per token (None when not asked)
    chosen_logprobs: list[list | None]
    hidden: list[torch.Tensor]  # per scheduled sequence: trunk hidden [computed, H] (MTP catch-up)


class SpecDecoder:
    def __init__(self, model: torch.nn.Module, cache: CacheManager, sampler: Sampler,
                 device: torch.device, config: SpeculativeConfig, scratch_base: int, max_num_seqs: int):
        """State slots [scratch_base, scratch_base + max_num_seqs * k) are this decoder's scratch:
        verify row r keeps the state after its draft position j in slot scratch_base + r*k + j."""
        self.model = model
        self.cache = cache
        self.sampler = sampler
        self.device = device
        self.k = config.num_speculative_tokens
        self.disable_by_batch_size = config.disable_by_batch_size
        self.scratch_base = scratch_base
        self.max_num_seqs = max_num_seqs
        self.proposer = MTPProposer(model, cache, sampler.generator, device, self.k)
        self.proposer.structured = sampler.structured  # (grammar rows draft under their masks)
        self.stats = SpecStats(self.k)
        # CUDA graphs of the verify forward (cuda_graph.VerifyGraphRunner), set by LLMEngine on CUDA
        self.verify_graphs = None

    # ---- the step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> SpecStepOutput:
        S = len(sched.seqs)
        out = SpecStepOutput([0] * S, [], [], [], [], [None] * S)
        plain, verify = [], []
        for i, (seq, n) in enumerate(zip(sched.seqs, sched.num_new_tokens)):
            # a prompt's last chunk of one token (a prefix-cache hit, a chunk cut) is no decode:
            # its first token is sampled as any prompt's, so a seeded stream does not depend on chunking
            decode = (seq.num_tokens - seq.num_computed_tokens == 1 and not seq.children
                      and seq.num_computed_tokens >= seq.num_prompt_tokens)
            (verify if decode else plain).append(i)
        # CPU: prompt chunks and verify rows in one forward (a forward's fixed cost is per-op
        # overhead); CUDA: apart (the verify has its own kernels and graphs)
        if plain and verify and self.device.type != "cpu":
            self._forward(sched, plain, [], out)
            self._forward(sched, [], verify, out)
        else:
            self._forward(sched, plain, verify, out)
        return out

    def propose(self, sched: SchedulerOutput, out: SpecStepOutput, sampled: set[int]) -> None:
        """After the engine committed the step's tokens: MTP catch-up for every scheduled sequence
        still running, drafts for those that got tokens (seq ids in `sampled`). In a step above
        disable_by_batch_size there are no drafts and no MTP forward: each sequence keeps the
        trunk hidden of its new positions, caught up in the first step that drafts again."""
        off = self.disable_by_batch_size
        defer = off is not None and len(sched.seqs) > off
        entries, hidden = [], []
        for i, seq in enumerate(sched.seqs):
            if seq.finish_reason is not None or out.computed[i] == 0:
                continue
            n = out.computed[i]
            c, h = seq.num_computed_tokens - n, out.hidden[i]
            if defer:
                if not seq.mtp_pending:
                    seq.mtp_pending_start = c
                seq.mtp_pending.append(h.clone())  # a copy: the step's [T, H] is not kept alive
                continue
            if seq.mtp_pending:  # positions whose catch-up was deferred come first
                c = seq.mtp_pending_start
                h = torch.cat([*seq.mtp_pending, h])
                n = seq.num_computed_tokens - c
                seq.mtp_pending = []
            entries.append((seq, c, n, seq.seq_id in sampled))
            hidden.append(h)
        if entries:
            self.proposer.run(entries, hidden[0] if len(hidden) == 1 else torch.cat(hidden))
        self._cut_grammar_drafts(entries)

    def _cut_grammar_drafts(self, entries) -> None:
        """Drafts of a grammar row end at the first one its grammar rejects (as vLLM; for a row
        waiting for its start token, counted from the draft that is that token): a greedy row drops
        it, a random row keeps it (rejected for sure, the next token then comes from the residual
        distribution: dropping it would bias the output). No verify work for drafts after it."""
        so = self.sampler.structured
        if so is None or not so.rows:
            return
        for seq, *_ in entries:
            st, d = so.rows.get(seq.seq_id), seq.spec_token_ids
            if st is None or not d or (st.waiting_for is not None and st.waiting_for not in d):
                continue
            e = 0 if st.waiting_for is None else d.index(st.waiting_for) + 1
            n = e + st.matcher.validate_tokens(d[e:]) + (not seq.params.greedy)
            if n < len(d):
                seq.spec_token_ids = d[:n]
                if seq.spec_draft_probs is not None:
                    seq.spec_draft_probs = seq.spec_draft_probs[:n] if n else None

    def _forward(self, sched: SchedulerOutput, plain: list[int], verify: list[int], out: SpecStepOutput) -> None:
        """One trunk forward: prompt chunks and draft-less rows (`plain`: sampled where a prompt
        completes), then decode rows with drafts (`verify`: [x, d_1..d_m] each, verified, DeltaNet
        states rolled back to the last accepted position)."""
        runs, rows, row_pos = [], [], []
        end = 0
        for i in plain:
            seq, n = sched.seqs[i], sched.num_new_tokens[i]
            c = seq.num_computed_tokens
            runs.append((seq, c, seq.token_ids[c:c + n]))
            end += n
            if c + n == seq.num_tokens:
                for s in [seq, *seq.children]:
                    rows.append(s)
                    row_pos.append(end - 1)
        seqs = [sched.seqs[i] for i in verify]
        drafts = [s.spec_token_ids[:sched.num_new_tokens[i] - 1] for s, i in zip(seqs, verify)]
        runs += [(s, s.num_computed_tokens, [s.token_ids[-1]] + d) for s, d in zip(seqs, drafts)]
        K = max((len(d) for d in drafts), default=0)
        pts = None
        if K:
            # the state after draft position j of verify row r goes to a scratch slot; after the
            # last one it is the row's own slot (written anyway); prompt tokens keep none
            pts = [-1] * end + [self.scratch_base + r * self.k + j if j < len(d) else -1
                                for r, d in enumerate(drafts) for j in range(len(d) + 1)]
        ids, pos, batch = pack(self.cache, self.device, runs, pts)
        if not plain and self.verify_graphs is not None and self.verify_graphs.can_run(batch):
            # views of the graph's outputs: used up within this step, before the next replay
            hidden, logits = self.verify_graphs.run(ids, pos, batch)
        else:
            hidden = self.model(ids, pos, batch)  # [T, H]
            # logits where a token is chosen: completed prompts' last positions, every verify position
            T = hidden.shape[0]
            pick = row_pos + list(range(end, T)) if verify else row_pos
            if pick == list(range(T)):
                logits = self.model.compute_logits(hidden)  # [T, V]
            elif pick:
                logits = self.model.compute_logits(hidden[torch.tensor(pick, device=self.device)])
        o = 0
        for i in plain:
            n = sched.num_new_tokens[i]
            out.computed[i] = n
            out.hidden[i] = hidden[o:o + n]
            o += n
        if rows:
            # a seeded row draws the k uniforms a draft-less verify row would draw first, so its
            # stream does not depend on which of the two samples it (a recompute's last chunk)
            for s in rows:
                if s.generator is not None and not s.params.greedy:
                    torch.empty(self.k, device=self.device).uniform_(generator=s.generator)
            smp = self.sampler(logits[:len(rows)], rows)
            out.rows += rows
            out.tokens += [[t] for t in smp.token_ids]
            out.logprobs += [None if lp is None else [lp] for lp in smp.logprobs]
            out.chosen_logprobs += [None if c is None else [c] for c in smp.chosen_logprobs]
        if verify:
            self._verify(verify, seqs, drafts, K, hidden[end:], logits[len(rows):], out)

    def _verify(self, idx: list[int], seqs: list[Sequence], drafts: list[list[int]], K: int, hidden: torch.Tensor,
                logits: torch.Tensor, out: SpecStepOutput) -> None:
        """Verification of the decode rows' drafts (hidden, logits: their [T, *] part of the step)."""
        B = len(seqs)
        cu = [0]
        for d in drafts:
            cu.append(cu[-1] + len(d) + 1)
        raw = logits  # (logprobs come from the raw logits, as the sampler's)
        if self.sampler.structured is not None and self.sampler.structured.rows:
            # rows under a grammar: each position masked by the grammar's state after the drafts before it
            logits = self.sampler.structured.mask_verify(logits, seqs, drafts, cu[:-1])
        if all(s.request.plain_greedy for s in seqs):
            # argmax of the logits is the target: compare on the host, no per-row tensors
            target = argmax_rows(logits).tolist()
            n_acc, nxt = [], []
            for r, d in enumerate(drafts):
                t = target[cu[r]:cu[r + 1]]
                a = 0
                while a < len(d) and d[a] == t[a]:
                    a += 1
                n_acc.append(a)
                nxt.append(t[a])
            self._commit(idx, seqs, drafts, n_acc, nxt, hidden, raw, cu, out)
            return
        # every verify position as a row of its own: sequence + the drafts before it
        p_seqs = [s for s, d in zip(seqs, drafts) for _ in range(len(d) + 1)]
        p_extra = [d[:j] for d in drafts for j in range(len(d) + 1)]
        adj = adjusted_logits(logits, p_seqs, p_extra)
        n_drafts = torch.tensor([len(d) for d in drafts], device=self.device)
        d_ids = torch.tensor([d + [0] * (K - len(d)) for d in drafts], dtype=torch.long, device=self.device)
        pad = torch.tensor([cu[r] + min(j, len(drafts[r])) for r in range(B) for j in range(K + 1)],
                           device=self.device).view(B, K + 1)  # flat position of (row, j), clamped
        n_acc = torch.zeros(B, dtype=torch.long, device=self.device)
        nxt = torch.zeros(B, dtype=torch.long, device=self.device)
        greedy = [r for r, s in enumerate(seqs) if s.params.greedy]
        rand = [r for r, s in enumerate(seqs) if not s.params.greedy]
        if greedy:
            g = torch.tensor(greedy, device=self.device)
            target_ids = adj.argmax(-1)[pad[g]]  # [G, K+1]
            n_acc[g], nxt[g] = verify_greedy(target_ids, d_ids[g], n_drafts[g])
        if rand:
            rt = torch.tensor(rand, device=self.device)
            rs = [seqs[r] for r in rand]
            flat = pad[rt].reshape(-1)
            target = final_probs(adj[flat], [p_seqs[int(f)] for f in flat.tolist()]).view(len(rand), K + 1, -1)
            V = target.shape[-1]
            draft = torch.zeros(len(rand), K, V, device=self.device)
            for j, r in enumerate(rand):
                if drafts[r]:
                    draft[j, :len(drafts[r])] = seqs[r].spec_draft_probs[:len(drafts[r])]
            # k uniforms per row whatever K is, so a seeded row's stream never depends on the batch
            u = draw("uniform", len(rand), self.k, rs, self.sampler.generator, self.device)[:, :K]
            q = draw("exp", len(rand), V, rs, self.sampler.generator, self.device)
            n_acc[rt], nxt[rt] = rejection_sample(target, draft, d_ids[rt], n_drafts[rt], u, q)
        self._commit(idx, seqs, drafts, n_acc.tolist(), nxt.tolist(), hidden, raw, cu, out)

    def _commit(self, idx, seqs, drafts, n_acc, nxt, hidden, logits, cu, out) -> None:
        """Record each verify row's tokens (a accepted drafts + one), roll rejected rows' DeltaNet
        states back to their last accepted position, and compute logprobs where asked."""
        roll_src, roll_dst = [], []
        want_lp = []
        for r, (i, s, d) in enumerate(zip(idx, seqs, drafts)):
            a = n_acc[r]
            self.stats.add(len(d), a)
            if a < len(d):  # rejected: the state after the last accepted position is in scratch
                roll_src.append(self.scratch_base + r * self.k + a)
                roll_dst.append(s.slot)
            out.computed[i] = a + 1
            out.hidden[i] = hidden[cu[r]:cu[r] + a + 1]
            out.rows.append(s)
            out.tokens.append(d[:a] + [nxt[r]])
            s.spec_token_ids, s.spec_draft_probs = [], None
            if s.params.logprobs is not None:
                want_lp.append(len(out.rows) - 1)
            out.logprobs.append(None)
            out.chosen_logprobs.append(None)
        if roll_src:
            self.cache.copy_slots(roll_src, roll_dst)
        for w in want_lp:
            r = w - (len(out.rows) - len(seqs))
            toks = out.tokens[w]
            raw = logits[cu[r]:cu[r] + len(toks)]
            so = Sampler._finish(raw, torch.tensor(toks, device=self.device), [seqs[r].params] * len(toks))
            out.logprobs[w], out.chosen_logprobs[w] = so.logprobs, so.chosen_logprobs
