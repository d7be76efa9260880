"""The probability side of speculative decoding, on known distributions: the rejection-sampling
rule reproduces a target Markov chain from a bad draft chain (chi-square over 3-token sequences;
a naive rule fails the same test), greedy verification, `final_probs` is exactly the distribution
the plain Sampler draws from (same exponential race -> same tokens), `adjusted_logits` with draft
extras equals penalties on the sequence with those tokens appended, and config parsing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from qwen3next.engine.rejection_sampler import (adjusted_logits, final_probs, race, rejection_sample,
                                                verify_greedy)
from qwen3next.engine.sampler import Sampler, apply_penalties, exponential_
from qwen3next.engine.sequence import Request, Sequence
from qwen3next.engine.spec_decode import SpeculativeConfig, SpecStats
from qwen3next.sampling_params import SamplingParams

V, K, LEN = 4, 3, 3


def chain(seed: int, sharp: float) -> torch.Tensor:
    """[V, V] row-stochastic: next-token distribution given the previous token."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(V, V, generator=g), -1)


P, Q = chain(1, 1.5), chain(2, 1.5)  # target and a deliberately different draft


def speculate(rule, trials: int = 30000, seed: int = 0) -> torch.Tensor:
    """Run speculative generation of LEN tokens after token 0 for `trials` independent rows,
    every round drafting K tokens from Q; -> [trials, LEN] tokens."""
    g = torch.Generator().manual_seed(seed)
    out = [[] for _ in range(trials)]
    last = torch.zeros(trials, dtype=torch.long)
    live = torch.arange(trials)
    while len(live):
        B = len(live)
        d, prev = [], last[live]
        for _ in range(K):  # drafts: d_j ~ Q[d_{j-1}]
            prev = torch.multinomial(Q[prev], 1, generator=g).squeeze(1)
            d.append(prev)
        d = torch.stack(d, 1)  # [B, K]
        ctx = torch.cat([last[live, None], d], 1)  # target position j conditions on ctx[:, j]
        target = P[ctx]  # [B, K+1, V]
        draft = Q[ctx[:, :K]]  # [B, K, V]
        u = torch.rand(B, K, generator=g)
        q = torch.empty(B, V).exponential_(generator=g)
        n_acc, nxt = rule(target, draft, d, torch.full((B,), K), u, q)
        for r, (a, t) in enumerate(zip(n_acc.tolist(), nxt.tolist())):
            row = out[int(live[r])]
            row += d[r, :a].tolist() + [t]
            last[live[r]] = row[-1]
        live = torch.tensor([i for i in live.tolist() if len(out[i]) < LEN], dtype=torch.long)
    return torch.tensor([o[:LEN] for o in out])


def chi_square(samples: torch.Tensor) -> tuple[float, int]:
    """Chi-square of the empirical 3-token sequence counts against the target chain."""
    n = samples.shape[0]
    codes = (samples * torch.tensor([V * V, V, 1])).sum(1)
    counts = torch.bincount(codes, minlength=V ** LEN).double()
    stat = 0.0
    for i, seq in enumerate(itertools.product(range(V), repeat=LEN)):
        p, prev = 1.0, 0
        for t in seq:
            p *= float(P[prev, t])
            prev = t
        e = n * p
        stat += (counts[i].item() - e) ** 2 / e
    return stat, V ** LEN - 1


def test_rejection_sampling_reproduces_the_target_chain():
    stat, df = chi_square(speculate(rejection_sample))
    # df + 4 sd: a p-value around 1e-4; the fixed seeds make the test deterministic
    assert stat < df + 4 * math.sqrt(2 * df), stat


def test_the_chi_square_check_catches_a_wrong_rule():
    def accept_if_plausible(target, draft, d, nd, u, q):
        # a plausible-looking bug: accept when the target merely gives the draft some mass
        p_d = target[:, :-1].gather(2, d[..., None]).squeeze(-1)
        n_acc = (p_d > 0.1).long().cumprod(-1).sum(-1)
        return n_acc, race(target[torch.arange(len(d)), n_acc], q)

    stat, df = chi_square(speculate(accept_if_plausible))
    assert stat > df + 10 * math.sqrt(2 * df), stat


def test_rejection_sampling_identical_draft_accepts_everything():
    target = torch.softmax(torch.randn(5, K + 1, V), -1)
    d = torch.randint(0, V, (5, K))
    n_acc, _ = rejection_sample(target, target[:, :K], d, torch.full((5,), K), torch.rand(5, K) * 0.999,
                                torch.ones(5, V))
    assert n_acc.tolist() == [K] * 5


def test_rejection_sampling_respects_num_drafts_and_zero_mass():
    target = torch.zeros(2, K + 1, V)
    target[:, :, 2] = 1.0  # the target always says 2
    draft = torch.full((2, K, V), 1.0 / V)
    d = torch.tensor([[2, 2, 2], [2, 1, 2]])
    n_acc, nxt = rejection_sample(target, draft, d, torch.tensor([2, 3]), torch.zeros(2, K), torch.ones(2, V))
    # row 0: both real drafts accepted, bonus from position 2; row 1: d_2 = 1 has no target mass
    assert n_acc.tolist() == [2, 1] and nxt.tolist() == [2, 2]


def test_verify_greedy():
    tgt = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [5, 0, 0, 0]])
    d = torch.tensor([[5, 6, 7], [5, 9, 7], [1, 6, 7], [5, 6, 7]])
    n_acc, nxt = verify_greedy(tgt, d, torch.tensor([3, 3, 3, 0]))
    assert n_acc.tolist() == [3, 1, 0, 0] and nxt.tolist() == [8, 6, 5, 5]


# ---- final_probs / adjusted_logits against the plain sampler -----------------------------------
def seqs_for(params_list, outputs=(), eos=(7,)):
    rows = []
    for i, p in enumerate(params_list):
        req = Request(f"r{i}", [1, 2, 3], p, frozenset(eos), 100)
        s = Sequence(i, req, 0, torch.device("cpu"))
        s.token_ids += list(outputs)
        rows.append(s)
    return rows


PARAMS = [dict(temperature=1.0), dict(temperature=0.6), dict(top_k=3), dict(top_p=0.6), dict(min_p=0.15),
          dict(temperature=1.7, top_k=6, top_p=0.85), dict(top_k=5, min_p=0.2), dict(temperature=0.8, top_p=0.4)]


def test_final_probs_is_the_samplers_distribution():
    torch.manual_seed(0)
    Vs = 12
    params = [SamplingParams(**kw) for kw in PARAMS]
    seqs = seqs_for(params)
    for trial in range(20):
        logits = 2 * torch.randn(len(seqs), Vs)
        sampler = Sampler(torch.device("cpu"), seed=trial)
        plain = sampler._sample(logits, seqs)
        q = exponential_(torch.empty(len(seqs), Vs), torch.Generator().manual_seed(trial))
        assert race(final_probs(logits, seqs), q).tolist() == plain.tolist()
        p = final_probs(logits, seqs)
        assert torch.allclose(p.sum(-1), torch.ones(len(seqs)))


def test_adjusted_logits_equals_penalties_on_the_extended_sequence():
    Vs = 10
    p = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2, min_tokens=4)
    logits = torch.randn(3, Vs)
    extras = [[], [4], [4, 5]]
    got = adjusted_logits(logits, seqs_for([p] * 3, outputs=[4, 6]), extras)
    for i, e in enumerate(extras):
        ref_seq = seqs_for([p], outputs=[4, 6] + e)
        ref = apply_penalties(logits[i:i + 1], ref_seq)
        ref = Sampler._mask_min_tokens(ref, ref_seq)
        assert torch.allclose(got[i:i + 1], ref), i
    # min_tokens 4: 2 outputs + up to 1 extra still masks EOS (7), 2 + 2 extras no longer does
    assert got[0, 7] == -math.inf and got[1, 7] == -math.inf and got[2, 7] != -math.inf


# ---- config and stats --------------------------------------------------------------------------
def test_speculative_config_parsing():
    c = SpeculativeConfig.parse('{"method": "qwen3_next_mtp", "num_speculative_tokens": 2}')
    assert c == SpeculativeConfig("qwen3_next_mtp", 2)
    assert SpeculativeConfig.parse({"method": "mtp", "num_speculative_tokens": 4}).num_speculative_tokens == 4
    assert SpeculativeConfig.parse(None) is None and SpeculativeConfig.parse({}) is None
    c = SpeculativeConfig.parse({"method": "mtp", "num_speculative_tokens": 1, "disable_by_batch_size": 8})
    assert c.disable_by_batch_size == 8
    for bad, field in [({"method": "eagle", "num_speculative_tokens": 1}, "method"),
                       ({"method": "mtp", "num_speculative_tokens": 5}, "num_speculative_tokens"),
                       ({"method": "mtp", "num_speculative_tokens": True}, "num_speculative_tokens"),
                       ({"method": "mtp"}, "num_speculative_tokens"),
                       ({"method": "mtp", "num_speculative_tokens": 1, "model": "x"}, "model"),
                       ({"method": "mtp", "num_speculative_tokens": 1, "disable_by_batch_size": 0},
                        "disable_by_batch_size"),
                       ("{not json", "JSON"), ("[1]", "JSON object")]:
        with pytest.raises(ValueError, match=field):
            SpeculativeConfig.parse(bad)


def test_spec_stats():
    s = SpecStats(3)
    s.add(3, 3)
    s.add(3, 1)
    s.add(2, 0)
    s.add(0, 0)  # a draft-less decode is not a verify
    d = s.as_dict()
    assert d["num_verifies"] == 3 and d["num_draft_tokens"] == 8 and d["num_accepted_tokens"] == 4
    assert d["accepted_per_pos"] == [2, 1, 1] and d["drafted_per_pos"] == [3, 3, 2]
    assert d["mean_accepted_length"] == pytest.approx(1 + 4 / 3)


def test_top_p_alone_needs_no_full_sort(monkeypatch):
    """top_p without top_k over a large vocabulary: the capped candidate search gives the same
    distribution as sorting the whole vocabulary (peaked rows use the cap, flat ones fall back)."""
    import qwen3next.engine.sampler as sampler_mod

    torch.manual_seed(0)
    Vs = 1000
    params = [SamplingParams(top_p=0.9), SamplingParams(top_p=0.5, temperature=0.7), SamplingParams(top_k=40, top_p=0.8)]
    seqs = seqs_for(params)
    peaked = 8 * torch.randn(len(seqs), Vs)
    flat = 0.01 * torch.randn(len(seqs), Vs)
    real_topk = sampler_mod.topk_rows
    for logits, widths in ((peaked, [128]), (flat, [128, Vs])):
        asked = []
        monkeypatch.setattr(sampler_mod, "topk_rows", lambda x, k: (asked.append(k), real_topk(x, k))[1])
        capped = final_probs(logits, seqs)
        assert asked == widths
        monkeypatch.setattr(sampler_mod, "TOP_P_CANDIDATES", 10 ** 9)
        whole = final_probs(logits, seqs)
        monkeypatch.undo()
        assert torch.allclose(capped, whole, atol=1e-6)
        assert ((capped > 0).sum(-1) < Vs).all()
