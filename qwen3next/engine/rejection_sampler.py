"""The probability side of speculative decoding: what distribution a row samples from, and the
accept/reject rule that keeps the output distribution exactly the target model's.

`adjusted_logits` applies logit_bias, penalties and min_tokens for a sequence as if `extra` draft
tokens had already been appended (so verify position i sees d_1..d_i); `final_probs` applies temperature,
min_p, top_k and top_p exactly as Sampler._sample does (same candidates, same cut-offs), returning
the distribution its exponential race draws from. `rejection_sample` is the standard rule (Leviathan
et al. 2023 / Chen et al. 2023) on explicit distributions with the randomness passed in;
`verify_greedy` is its temperature-0 limit (accept while draft == argmax).
"""

from __future__ import annotations

import math

import torch

from qwen3next.engine.sampler import (apply_logit_bias, apply_penalties, exponential_, output_counts,
                                      truncate)
from qwen3next.engine.sequence import Sequence


def adjusted_logits(logits: torch.Tensor, seqs: list[Sequence], extras: list[list[int]]) -> torch.Tensor:
    """logits [N, V] (row i is seqs[i] followed by extras[i]) -> biased, penalised, min_tokens-masked
    copy, in Sampler.__call__'s order."""
    N, V = logits.shape
    dev = logits.device
    params = [s.params for s in seqs]
    out = logits
    if any(p.logit_bias for p in params):
        out = apply_logit_bias(logits, seqs)
    if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
        counts = torch.stack([output_counts(s, V, dev) for s in seqs])  # [N, V]
        r_idx = [i for i, e in enumerate(extras) for _ in e]
        if r_idx:
            counts = counts.index_put(
                (torch.tensor(r_idx, device=dev), torch.tensor([t for e in extras for t in e], device=dev)),
                torch.ones(len(r_idx), device=dev), accumulate=True)
        out = apply_penalties(out, seqs, counts)
    rows, toks = [], []
    for i, (s, e) in enumerate(zip(seqs, extras)):
        if s.num_output_tokens + len(e) < s.params.min_tokens:
            stops = [t for t in s.request.eos_ids | s.request.stop_ids if t < V]
            rows += [i] * len(stops)
            toks += stops
    if rows:
        out = out.clone() if out is logits else out
        out[rows, toks] = -math.inf
    return out


def final_probs(x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Adjusted logits [N, V] of random (temperature > 0) rows -> the distribution [N, V] fp32 that
    Sampler._sample draws from: temperature, min_p, then top_k / top_p over sorted candidates."""
    N, V = x.shape
    dev = x.device
    params = [s.params for s in seqs]
    x = x.float() / torch.tensor([p.temperature for p in params], device=dev)[:, None]
    min_p = [p.min_p for p in params]
    if any(min_p):
        log_mp = torch.tensor([math.log(m) if m > 0 else -math.inf for m in min_p], device=dev)
        x = x.masked_fill(x < x.max(-1, keepdim=True).values + log_mp[:, None], -math.inf)
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    trunc = [i for i, p in enumerate(params) if ks[i] < V or p.top_p < 1.0]
    probs = torch.softmax(x, -1)
    if not trunc:
        return probs
    t = torch.tensor(trunc, device=dev)
    # the same candidates, cut-offs and order as the sampler's
    vals, cand = truncate(x[t], [ks[i] for i in trunc], [params[i].top_p for i in trunc])
    probs[t] = torch.zeros(len(trunc), V, device=dev).scatter(1, cand, torch.softmax(vals, -1))
    return probs


def race(probs: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Sample one token per row from (unnormalised) probs [N, V] given q ~ Exp(1) [N, V]."""
    return (probs / q).argmax(-1)


def rejection_sample(target: torch.Tensor, draft: torch.Tensor, draft_ids: torch.Tensor,
                     num_drafts: torch.Tensor, u: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule on explicit distributions.

    target [B, K+1, V]: target probs at each verify position; draft [B, K, V]: the draft
    distributions the draft_ids [B, K] were drawn from; num_drafts [B] (drafts past it are padding);
    u [B, K] ~ U[0, 1); q [B, V] ~ Exp(1) for the one token drawn after the accepted run.
    Draft i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the
    next token comes from normalise(max(0, p_i - q_i)), after an all-accepted run from p_K.
    -> (num_accepted [B] long, next token [B] long).
    """
    B, K1, V = target.shape
    K = K1 - 1
    ar = torch.arange(B, device=target.device)
    if K > 0:
        p_d = target[:, :K].gather(2, draft_ids.clamp(min=0)[..., None]).squeeze(-1)  # [B, K]
        q_d = draft.gather(2, draft_ids.clamp(min=0)[..., None]).squeeze(-1)
        live = torch.arange(K, device=target.device)[None, :] < num_drafts[:, None]
        ok = (u * q_d < p_d) & live
        # the accepted run: drafts up to the first rejection
        n_acc = ok.long().cumprod(-1).sum(-1)
    else:
        n_acc = torch.zeros(B, dtype=torch.long, device=target.device)
    p = target[ar, n_acc]  # [B, V]
    rejected = n_acc < num_drafts
    if K > 0:
        resid = (p - draft[ar, n_acc.clamp(max=K - 1)]).clamp(min=0)
        # p == q exactly leaves no residual mass (a rejection then has probability 0): keep p
        resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p)
        p = torch.where(rejected[:, None], resid, p)
    return n_acc, race(p, q)


def verify_greedy(target_ids: torch.Tensor, draft_ids: torch.Tensor,
                  num_drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """target_ids [B, K+1] (argmax at each verify position), draft_ids [B, K], num_drafts [B]
    -> (num_accepted [B], next token [B]): accept while the draft equals the target's argmax."""
    B, K1 = target_ids.shape
    K = K1 - 1
    if K == 0:
        return torch.zeros(B, dtype=torch.long, device=target_ids.device), target_ids[:, 0]
    live = torch.arange(K, device=target_ids.device)[None, :] < num_drafts[:, None]
    n_acc = ((draft_ids == target_ids[:, :K]) & live).long().cumprod(-1).sum(-1)
    return n_acc, target_ids.gather(1, n_acc[:, None]).squeeze(1)


def draw(kind: str, rows: int, width: int, seqs: list[Sequence], generator: torch.Generator,
         device) -> torch.Tensor:
    """[rows, width] draws, "exp" ~ Exp(1) or "uniform" ~ U[0, 1); row i comes from seqs[i]'s own
    generator when it has one (seeded requests), else from the shared `generator`."""
    x = torch.empty(rows, width, device=device)
    fill = exponential_ if kind == "exp" else (lambda t, g: t.uniform_(generator=g))
    if any(s.generator is None for s in seqs):  # (all rows seeded: no shared draw)
        fill(x, generator)
    for i, s in enumerate(seqs):
        if s.generator is not None:
            fill(x[i], s.generator)
    return x
