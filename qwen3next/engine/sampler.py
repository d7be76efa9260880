"""Next-token sampling for a batch of rows, each with its own SamplingParams (vLLM semantics).

Order per row (vLLM V1's): logit_bias, penalties (repetition over prompt + output, then frequency
and presence over the output), min_tokens (stop tokens masked), greedy = argmax of that (biased
greedy rows too); otherwise temperature, min_p, top_k, top_p, then an exponential race
`argmax(p / q)`, q ~ Exp(1) (`exponential_`) over the whole vocabulary, drawn from the row's own
torch.Generator when it has a seed, so a seeded row samples the same tokens whatever else is in
the batch. Logprobs are the model's raw log-softmax (vLLM's default "raw_logprobs"): top-N plus
the chosen token, with ranks. All vocabulary work is batched. Rows under a grammar (structured
outputs) first get their grammar's mask (disallowed tokens at -inf); logprobs stay the raw ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from qwen3next.engine.sequence import Sequence
from qwen3next.outputs import Logprob


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[dict[int, Logprob] | None]  # per row; None where not asked
    chosen_logprobs: list[float | None]  # raw logprob of the chosen token, where asked


def output_counts(seq: Sequence, vocab: int, device) -> torch.Tensor:
    """[V] float: occurrences of each token in the sequence's output, kept up to date in place."""
    c = seq.output_counts
    if c is None:
        c = seq.output_counts = torch.zeros(vocab, device=device)
    new = seq.token_ids[seq.num_prompt_tokens + seq.num_counted:]
    if new:
        c.index_add_(0, torch.tensor(new, device=device), torch.ones(len(new), device=device))
        seq.num_counted += len(new)
    return c


def prompt_mask(seq: Sequence, vocab: int, device) -> torch.Tensor:
    """[V] bool: which tokens occur in the prompt (built once per request)."""
    req = seq.request
    if req.prompt_mask is None:
        m = torch.zeros(vocab, dtype=torch.bool, device=device)
        m[torch.tensor(req.prompt_token_ids, device=device)] = True
        req.prompt_mask = m
    return req.prompt_mask


def apply_logit_bias(logits: torch.Tensor, rows: list[Sequence]) -> torch.Tensor:
    """logits [B, V] -> a copy with each row's SamplingParams.logit_bias added (the same tensor
    when no row has one). Token ids were checked against the vocabulary at add_request."""
    r_idx, t_idx, vals = [], [], []
    for i, s in enumerate(rows):
        bias = s.params.logit_bias
        if bias:
            r_idx += [i] * len(bias)
            t_idx += bias.keys()
            vals += bias.values()
    if not r_idx:
        return logits
    dev = logits.device
    # accumulate=True adds to the logits (without it index_put would overwrite them)
    return logits.index_put((torch.tensor(r_idx, device=dev), torch.tensor(t_idx, device=dev)),
                            torch.tensor(vals, dtype=logits.dtype, device=dev), accumulate=True)


def apply_penalties(logits: torch.Tensor, rows: list[Sequence],
                    counts: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> a penalised copy (vLLM's apply_penalties). counts [B, V]: output-token
    counts to penalise (default: each row's generated tokens; speculative verify adds drafts)."""
    B, V = logits.shape
    dev = logits.device
    params = [s.params for s in rows]
    if counts is None:
        counts = torch.stack([output_counts(s, V, dev) for s in rows])  # [B, V]
    out_mask = counts > 0
    logits = logits.clone()
    rep = [p.repetition_penalty for p in params]
    if any(r != 1.0 for r in rep):
        seen = out_mask | torch.stack([prompt_mask(s, V, dev) for s in rows])
        r = torch.tensor(rep, dtype=logits.dtype, device=dev)[:, None].expand(B, V)
        r = torch.where(seen, r, torch.ones_like(r))
        logits = torch.where(logits > 0, logits / r, logits * r)
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype, device=dev)
    pres = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype, device=dev)
    logits -= freq[:, None] * counts + pres[:, None] * out_mask
    return logits


def exponential_(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fill x with Exp(1) draws in place: -log(U), U ~ U[0, 1) (5x cheaper than Tensor.exponential_
    on CPU; U = 0 gives +inf, a token that then loses the race, never NaN). The sampler and the
    speculative rejection sampler both draw through this, so their races stay the same."""
    return x.uniform_(generator=generator).log_().neg_()


def argmax_rows(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """x [B, V] -> [B] long, the first index of each row's maximum (torch.argmax's choice).

    On CPU argmax is a scalar loop while amax is vectorised: for large inputs take the max of
    each block of `block` columns, the first block holding the row's max, then argmax inside it."""
    B, V = x.shape
    if x.device.type != "cpu" or B * V < 32768 or V % block:
        return x.argmax(-1)
    xb = x.reshape(B, V // block, block)
    best = xb.amax(-1).argmax(-1)  # [B]
    return best * block + xb[torch.arange(B), best].argmax(-1)


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, V] float32 -> (values, indices) [B, k] of each row's k largest, descending, equal
    values by lower index (which of several values equal to the k-th largest make the cut is left
    open, as with torch.topk). The sampler and the rejection sampler's final_probs both use it.

    On CPU torch.topk costs ~8 us per row (64 x 1152, k = 20: 0.55 ms); numpy's introselect
    (argpartition) plus a sort of the k chosen does the batch 2-3x faster."""
    B, V = x.shape
    if x.device.type != "cpu" or B < 4 or V > 16384 or k >= V or x.dtype != torch.float32:
        return x.topk(k, dim=-1)
    a = x.detach().numpy()
    part = np.argpartition(a, V - k, axis=1)[:, V - k:]  # [B, k] the k largest, unordered
    vals = np.take_along_axis(a, part, 1)
    order = np.lexsort((part, -vals), axis=1)  # by value descending, then index
    return (torch.from_numpy(np.take_along_axis(vals, order, 1)),
            torch.from_numpy(np.take_along_axis(part, order, 1)))


# top-p without top-k: how many candidates to try before sorting the whole vocabulary
TOP_P_CANDIDATES = 128


def truncate(x: torch.Tensor, ks: list[int], top_p: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, V] temperature-scaled logits of rows with top_k (ks[i] < V) and/or top_p < 1 ->
    (vals [R, K], cand [R, K]): each row's best candidates, descending, the dropped ones at -inf
    (vLLM order: top-k, then top-p over the renormalised top-k distribution). The sampler and
    rejection_sampler.final_probs both truncate through this.

    Rows with top_p alone would need the whole vocabulary sorted; when the TOP_P_CANDIDATES best
    already hold top_p of their row's mass, every later token is dropped anyway, so they are enough."""
    R, V = x.shape
    dev = x.device
    k_max, whole = max(ks), None
    if k_max == V and V > 2 * TOP_P_CANDIDATES and all(k == V or k <= TOP_P_CANDIDATES for k in ks):
        w = torch.tensor([i for i, k in enumerate(ks) if k == V], device=dev)
        vals, cand = topk_rows(x, TOP_P_CANDIDATES)
        mass = (torch.logsumexp(vals[w], -1) - torch.logsumexp(x[w], -1)).exp()  # [W]
        if bool((mass >= torch.tensor([top_p[i] for i in w.tolist()], device=dev)).all()):
            k_max, whole = TOP_P_CANDIDATES, (w, mass)
    if whole is None:
        vals, cand = topk_rows(x, k_max)
    pos = torch.arange(k_max, device=dev)
    k_t = torch.tensor([min(k, k_max) for k in ks], device=dev)
    vals = vals.masked_fill(pos[None, :] >= k_t[:, None], -math.inf)
    if any(p < 1.0 for p in top_p):
        pr = torch.softmax(vals, -1)
        if whole is not None:  # top-p alone counts mass over the whole vocabulary
            pr[whole[0]] *= whole[1][:, None]
        before = pr.cumsum(-1) - pr  # mass of the better candidates
        drop = before >= torch.tensor(top_p, device=dev)[:, None]
        drop[:, 0] = False
        vals = vals.masked_fill(drop, -math.inf)
    return vals, cand


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        # draws for rows without a seed of their own
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        # grammar masks (engine/structured_output.StructuredOutputs), set by LLMEngine
        self.structured = None

    def __call__(self, logits: torch.Tensor, rows: list[Sequence]) -> SamplerOutput:
        """logits [B, V] float32 (row i belongs to rows[i]) -> one token per row."""
        raw = logits
        if self.structured is not None and self.structured.rows:
            logits = self.structured.mask(logits, rows)
        if all(s.request.plain_greedy for s in rows):
            n = len(rows)
            return SamplerOutput(argmax_rows(logits).tolist(), [None] * n, [None] * n)
        params = [s.params for s in rows]
        if any(p.logit_bias for p in params):
            logits = apply_logit_bias(logits, rows)
        if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
            logits = apply_penalties(logits, rows)
        logits = self._mask_min_tokens(logits, rows)
        ids = logits.argmax(-1)  # greedy rows keep this
        random = [i for i, p in enumerate(params) if not p.greedy]
        if random:
            if len(random) == len(rows):
                ids = self._sample(logits, rows)
            else:
                r = torch.tensor(random, device=logits.device)
                ids[r] = self._sample(logits[r], [rows[i] for i in random])
        return self._finish(raw, ids, params)

    # ---- steps ----------------------------------------------------------------------------
    @staticmethod
    def _mask_min_tokens(logits: torch.Tensor, rows: list[Sequence]) -> torch.Tensor:
        r_idx, t_idx = [], []
        for i, s in enumerate(rows):
            if s.num_output_tokens < s.params.min_tokens:
                stops = s.request.eos_ids | s.request.stop_ids
                r_idx += [i] * len(stops)
                t_idx += list(stops)
        if not r_idx:
            return logits
        logits = logits.clone()  # the raw logits stay intact for logprobs
        V = logits.shape[1]
        keep = [(r, t) for r, t in zip(r_idx, t_idx) if t < V]
        if keep:
            r, t = zip(*keep)
            logits[list(r), list(t)] = -math.inf
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]) -> torch.Tensor:
        """Random rows: temperature, min_p, top_k, top_p, then the exponential race -> [B] long.

        q ~ Exp(1) is drawn for every (row, token id); a seeded row redraws its whole row from its
        own generator, so its stream never depends on the batch. (rejection_sampler.final_probs
        mirrors these steps; its test relies on this draw layout.)"""
        B, V = logits.shape
        dev = logits.device
        params = [s.params for s in rows]
        temp = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=dev)
        x = logits / temp[:, None]
        min_p = [p.min_p for p in params]
        if any(min_p):
            # p_i < min_p * p_max  <=>  x_i < x_max + log(min_p)
            log_mp = torch.tensor([math.log(m) if m > 0 else -math.inf for m in min_p], device=dev)
            x = x.masked_fill(x < x.max(-1, keepdim=True).values + log_mp[:, None], -math.inf)
        q = torch.empty_like(x)
        if any(s.generator is None for s in rows):  # (a batch of seeded rows skips the shared draw)
            exponential_(q, self.generator)
        for i, s in enumerate(rows):
            if s.generator is not None:
                exponential_(q[i], s.generator)
        ks = [p.top_k if 0 < p.top_k < V else V for p in params]
        trunc = [i for i, p in enumerate(params) if ks[i] < V or p.top_p < 1.0]
        full = [i for i in range(B) if ks[i] == V and params[i].top_p >= 1.0]
        ids = torch.empty(B, dtype=torch.long, device=dev)
        if len(full) == B:  # no truncated row: race over the whole batch, no row gathers
            return argmax_rows(torch.softmax(x, -1).div_(q))
        if full:
            f = torch.tensor(full, device=dev)
            ids[f] = argmax_rows(torch.softmax(x[f], -1).div_(q[f]))
        # truncated rows work on their K best candidates, sorted descending
        t = torch.tensor(trunc, device=dev)
        if len(trunc) < B:
            x, q = x[t], q[t]
        vals, cand = truncate(x, [ks[i] for i in trunc], [params[i].top_p for i in trunc])  # [R, K]
        race = torch.softmax(vals, -1) / q.gather(1, cand)
        won = cand.gather(1, race.argmax(-1, keepdim=True)).squeeze(1)
        if len(trunc) == B:
            return won
        ids[t] = won
        return ids

    @staticmethod
    def _finish(raw: torch.Tensor, ids: torch.Tensor, params) -> SamplerOutput:
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        n = len(params)
        if not want:
            return SamplerOutput(ids.tolist(), [None] * n, [None] * n)
        w = torch.tensor(want, device=raw.device)
        lp = torch.log_softmax(raw[w].float(), -1)  # [R, V]
        chosen = ids[w]
        chosen_lp = lp.gather(1, chosen[:, None]).squeeze(1)
        rank = (lp > chosen_lp[:, None]).sum(-1) + 1
        top_n = max(params[i].logprobs for i in want)
        top_v, top_i = lp.topk(top_n, dim=-1) if top_n else (lp[:, :0], chosen[:, None][:, :0])
        ids_l, c_lp, rank_l = ids.tolist(), chosen_lp.tolist(), rank.tolist()
        top_v, top_i = top_v.tolist(), top_i.tolist()
        dicts: list = [None] * n
        chosen_out: list = [None] * n
        for j, i in enumerate(want):
            tok = ids_l[i]
            d = {tok: Logprob(c_lp[j], rank_l[j])}
            for r in range(params[i].logprobs):
                t = top_i[j][r]
                if t != tok:
                    d[t] = Logprob(top_v[j][r], r + 1)
            dicts[i] = d
            chosen_out[i] = c_lp[j]
        return SamplerOutput(ids_l, dicts, chosen_out)
