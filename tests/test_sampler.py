"""The batched sampler against the definitions: top-k / top-p / min-p / temperature statistics on a
known distribution, vLLM's penalties, min_tokens, raw logprobs, and per-row seeds that give the
same draws whatever else is in the batch. Plus SamplingParams validation and defaults."""

from __future__ import annotations

import math

import pytest
import torch

from qwen3next.engine.rejection_sampler import adjusted_logits
from qwen3next.engine.sampler import Sampler, apply_penalties
from qwen3next.engine.sequence import Request, Sequence
from qwen3next.sampling_params import SamplingParams

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
V = LOGITS.numel()


def rows_for(params_list, prompt=(1, 2), outputs=None, eos=()):
    rows = []
    for i, p in enumerate(params_list):
        req = Request(f"r{i}", list(prompt), p, frozenset(eos), 100)
        s = Sequence(i, req, 0, torch.device("cpu"))
        s.token_ids += list((outputs or {}).get(i, []))
        rows.append(s)
    return rows


def empirical(params: SamplingParams, n: int = 6000) -> torch.Tensor:
    rows = rows_for([params] * n)
    ids = Sampler(torch.device("cpu"), seed=0)(LOGITS.expand(n, V).clone(), rows).token_ids
    return torch.bincount(torch.tensor(ids), minlength=V).float() / n


def expected(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """The definition, token by token (vLLM order: temperature, min_p, top_k, top_p)."""
    p = torch.softmax(LOGITS / temperature, -1)
    keep = p >= min_p * p.max()
    order = torch.argsort(p, descending=True).tolist()
    if top_k:
        for t in order[top_k:]:
            keep[t] = False
    if top_p < 1:
        q = torch.where(keep, p, torch.zeros_like(p))
        q = q / q.sum()
        mass = 0.0
        for t in order:
            if not keep[t]:
                continue
            if mass >= top_p:
                keep[t] = False
            mass += q[t].item()
    out = torch.where(keep, p, torch.zeros_like(p))
    return out / out.sum()


@pytest.mark.parametrize("kw", [
    dict(temperature=1.0), dict(temperature=0.5), dict(top_k=3), dict(top_p=0.7), dict(min_p=0.2),
    dict(temperature=2.0, top_k=5, top_p=0.8), dict(top_k=4, min_p=0.3), dict(temperature=0.7, top_p=0.5, min_p=0.1),
])
def test_sampling_statistics_match_the_definition(kw):
    got = empirical(SamplingParams(**kw))
    want = expected(**kw)
    assert (got - want).abs().max() < 0.025, (got, want)
    assert torch.all(got[want == 0] == 0)


def test_greedy_rows_in_a_mixed_batch():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=0),
              SamplingParams(temperature=0.5, top_k=3), SamplingParams(temperature=1e-6)]
    ids = Sampler(torch.device("cpu"))(logits, rows_for(params)).token_ids
    am = logits.argmax(-1).tolist()
    assert ids[0] == am[0] and ids[2] == am[2] and ids[4] == am[4]
    assert ids[3] in torch.topk(logits[3], 3).indices.tolist()


def test_seeded_rows_ignore_the_rest_of_the_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 300, generator=g)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=42)

    def draws(batch_extra: int, other_params, sampler_seed: int) -> list[int]:
        rows = rows_for([seeded] + [other_params] * batch_extra)
        sampler = Sampler(torch.device("cpu"), seed=sampler_seed)
        out = []
        for _ in range(20):
            x = torch.cat([logits, torch.randn(batch_extra, 300, generator=g)])
            out.append(sampler(x, rows).token_ids[0])
        return out

    a = draws(0, None, 0)
    assert a == draws(3, SamplingParams(temperature=0.9, top_k=7), 1)
    assert a == draws(6, SamplingParams(temperature=0), 2)
    assert len(set(a)) > 5  # it really samples


def test_penalties_follow_vllm():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 12, generator=g)
    params = [SamplingParams(repetition_penalty=1.5, presence_penalty=0.4, frequency_penalty=0.3),
              SamplingParams(frequency_penalty=-0.5)]
    rows = rows_for(params, prompt=(1, 2, 2), outputs={0: [2, 5, 5, 7], 1: [3, 3, 3]})

    def definition():
        want = logits.clone()
        for i, s in enumerate(rows):
            p = s.params
            outs = s.output_token_ids
            for t in range(12):
                x = want[i, t].item()
                if t in outs or t in s.token_ids[: s.num_prompt_tokens]:
                    x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
                c = outs.count(t)
                x -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
                want[i, t] = x
        return want

    torch.testing.assert_close(apply_penalties(logits, rows), definition())
    # counts are kept per sequence and updated with the tokens generated since
    rows[0].token_ids += [9, 5]
    rows[1].token_ids += [11]
    torch.testing.assert_close(apply_penalties(logits, rows), definition())


def test_min_tokens_masks_stop_tokens():
    logits = torch.full((2, 10), -5.0)
    logits[:, 4] = 10.0  # eos is by far the best
    logits[:, 6] = 5.0  # then a stop token id
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[6])
    rows = rows_for([p, p], outputs={1: [1, 1]}, eos=(4,))
    assert Sampler(torch.device("cpu"))(logits, rows).token_ids == [logits[0, :4].argmax().item(), 4]


def test_logit_bias_steers_greedy_and_bans_sampled_tokens():
    logits = LOGITS.expand(2, V).clone()
    rows = rows_for([SamplingParams(temperature=0, logit_bias={7: 100.0}), SamplingParams(temperature=0)])
    assert Sampler(torch.device("cpu"))(logits, rows).token_ids == [7, 0]
    assert torch.equal(logits, LOGITS.expand(2, V))  # the caller's logits stay raw
    n = 4000
    p = SamplingParams(temperature=1.0, logit_bias={0: -100.0, 1: -100.0, 6: 2.0})
    freq = empirical(p, n)
    assert freq[0] == 0 and freq[1] == 0
    want = torch.softmax(LOGITS + torch.tensor([-100.0, -100, 0, 0, 0, 0, 2, 0]), -1)
    assert torch.allclose(freq, want, atol=0.03), (freq, want)


def test_logit_bias_comes_before_penalties_and_speculation_sees_the_same():
    # vLLM V1 order: bias, then repetition (sign-dependent), so -1 + 2 = 1 is divided, not multiplied
    logits = torch.tensor([[-1.0, 0.2, 0.0, 0.0]])
    p = SamplingParams(temperature=0, repetition_penalty=4.0, logit_bias={0: 2.0})
    rows = rows_for([p], prompt=(0,))
    adj = adjusted_logits(logits, rows, [[]])
    assert torch.allclose(adj, torch.tensor([[0.25, 0.2, 0.0, 0.0]]))
    assert Sampler(torch.device("cpu"))(logits, rows).token_ids == [0]  # penalty first would pick 1


def test_logprobs_are_raw_top_n_plus_chosen():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=1.0, logprobs=3, repetition_penalty=2.0),
              SamplingParams(temperature=0),
              SamplingParams(temperature=5.0, logprobs=0, seed=1)]
    out = Sampler(torch.device("cpu"))(logits, rows_for(params, outputs={0: [0, 1, 2]}))
    raw = torch.log_softmax(logits, -1)
    d0 = out.logprobs[0]
    top = raw[0].topk(3)
    chosen = out.token_ids[0]
    assert list(d0)[0] == chosen and set(top.indices.tolist()) <= set(d0)
    assert len(d0) == 3 + (chosen not in top.indices.tolist())
    for t, lp in d0.items():
        assert math.isclose(lp.logprob, raw[0, t].item(), abs_tol=1e-5)
        assert lp.rank == int((raw[0] > raw[0, t]).sum()) + 1
    assert out.logprobs[1] is None and out.chosen_logprobs[1] is None
    assert list(out.logprobs[2]) == [out.token_ids[2]]
    assert math.isclose(out.chosen_logprobs[2], raw[2, out.token_ids[2]].item(), abs_tol=1e-5)


def test_sampling_params_validation_names_the_field():
    for kw, field in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
                      (dict(min_p=1.5), "min_p"), (dict(presence_penalty=3), "presence_penalty"),
                      (dict(frequency_penalty=-2.5), "frequency_penalty"),
                      (dict(repetition_penalty=0), "repetition_penalty"), (dict(max_tokens=0), "max_tokens"),
                      (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(n=0), "n"),
                      (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
                      (dict(seed="x"), "seed"), (dict(logprobs=-1), "logprobs"),
                      (dict(logit_bias={-1: 1.0}), "logit_bias"), (dict(logit_bias={"5": 1.0}), "logit_bias"),
                      (dict(logit_bias={5: math.inf}), "logit_bias"), (dict(logit_bias=[5]), "logit_bias")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kw)


def test_generation_config_fills_only_unset_fields():
    gen = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 99, "eos_token_id": [1]}
    p = SamplingParams(temperature=0.0, top_k=-1).with_generation_config(gen)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.min_p) == (0.0, 0.95, 0, 99, 0.0)
    d = SamplingParams()
    assert (d.temperature, d.top_p, d.top_k, d.max_tokens) == (1.0, 1.0, 0, 16)
    assert not d.is_set("temperature") and SamplingParams(temperature=1.0).is_set("temperature")
    assert SamplingParams(stop="x").stop == ["x"]


@pytest.mark.parametrize("shape", [(3, 50), (64, 512), (5, 64 * 300)])
def test_argmax_rows_is_torch_argmax_with_ties(shape):
    """The blocked CPU argmax picks what torch.argmax picks: the first maximum, -inf rows included."""
    from qwen3next.engine.sampler import argmax_rows

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    x[0, 3] = x[0, shape[1] - 1] = 9.0  # a tie: the first one wins
    x[1] = -math.inf
    x[1, shape[1] // 2] = -1.0
    x[2] = 0.0  # all equal: index 0
    assert torch.equal(argmax_rows(x), x.argmax(-1))


def test_topk_rows_is_torch_topk_with_ties_by_index():
    """The numpy top-k the sampler and the rejection sampler share: torch.topk's values, indices
    that point at them, equal values lower index first."""
    from qwen3next.engine.sampler import topk_rows

    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 300, generator=g)
    x[0, [7, 3, 250]] = 5.0  # a three-way tie at the top
    x[1] = 0.0
    x[1, 299] = 1.0  # one max, then 299 equal values: indices 0, 1, ... fill the rest
    x[2, :290] = -math.inf
    for k in (1, 5, 20):
        vals, idx = topk_rows(x, k)
        ref_v, _ = x.topk(k, dim=-1)
        assert torch.equal(vals, ref_v)
        assert torch.equal(x.gather(1, idx), vals)
        assert idx[0, :3].tolist() == [3, 7, 250][:k]
        assert idx[1, 0] == 299 and idx[1, 1:].tolist() == sorted(idx[1, 1:].tolist())
