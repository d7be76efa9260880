"""MTP speculative decoding in the engine, on the tiny checkpoint (float32, CPU).

Greedy outputs with k = 1..3 equal the plain engine's under mixed batches, chunked prefill with
small budgets (drafts cut by the budget), preemption, n > 1 and aborts, both with the random MTP
head (acceptance near 0: every step rolls the DeltaNet states back) and with a scripted drafter
that proposes the true continuation with planted errors (long accepted runs, partial rejects).
Stop token / max_tokens inside an accepted run end the output exactly where the plain engine
does. Sampling: the distribution of 3-token continuations under spec decoding matches the exact
target distribution (chi-square) with a drafter whose proposals are often wrong.
"""

from __future__ import annotations

import math

import pytest
import torch

from qwen3next.engine import EngineArgs, LLMEngine
from qwen3next.engine.cache import bytes_per_block, bytes_per_slot
from qwen3next.engine.mtp_proposer import MTPProposer
from qwen3next.engine.rejection_sampler import adjusted_logits, final_probs
from qwen3next.forward_batch import ForwardBatch
from qwen3next.loader import load_model
from qwen3next.sampling_params import SamplingParams

LENGTHS = [1, 3, 9, 16, 17, 33, 70]
MAX_NEW = 12


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    m, _ = load_model(tiny_ckpt, dtype=torch.float32, device="cpu", with_mtp=True, progress=False)
    return m


@pytest.fixture(scope="module")
def prompts(model):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]


def make_engine(model, k=None, **knobs) -> LLMEngine:
    knobs.setdefault("max_model_len", 256)
    spec = {"method": "qwen3_next_mtp", "num_speculative_tokens": k} if k else None
    return LLMEngine(model, EngineArgs(speculative_config=spec, **knobs), eos_token_ids=[])


def kv_budget(model, k: int, block_size: int, num_seqs: int, num_blocks: int) -> int:
    spec = model.state_spec()
    return (num_seqs * (1 + k) * bytes_per_slot(spec, torch.float32)
            + num_blocks * bytes_per_block(spec, block_size, torch.float32))


def run(engine, prompts, params, arrivals=None, abort_at=None):
    """Drive to completion -> request id -> (tokens per sample, finish reasons)."""
    arrivals = arrivals or [0] * len(prompts)
    params = params if isinstance(params, list) else [params] * len(prompts)
    got: dict[str, dict[int, list[int]]] = {}
    why: dict[str, dict[int, str]] = {}
    step = 0
    while True:
        for i, p in enumerate(prompts):
            if arrivals[i] == step:
                engine.add_request(str(i), p, params[i])
                got[str(i)], why[str(i)] = {}, {}
        if abort_at is not None and step == abort_at[1]:
            engine.abort_request(abort_at[0])
        if step > max(arrivals) and not engine.has_unfinished_requests():
            break
        for out in engine.step():
            for c in out.outputs:
                got[out.request_id].setdefault(c.index, []).extend(c.token_ids)
                if c.finish_reason:
                    why[out.request_id][c.index] = c.finish_reason
        step += 1
    return {r: ([d[k] for k in sorted(d)], [why[r].get(k) for k in sorted(d)]) for r, d in got.items()}


def assert_pools_empty(engine) -> None:
    c = engine.cache
    assert c.num_free_blocks == c.plan.num_blocks and all(r == 0 for r in c._refs)
    assert c.num_free_slots == c.scratch_base
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine.requests


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(model, prompts):
    return run(make_engine(model, max_num_seqs=8), prompts, GREEDY)


class ScriptedDrafts:
    """Replace the MTP's draft choice (the MTP forwards still run): propose the true greedy
    continuation from `reference`, wrong wherever the draft's output index % period == bad."""

    def __init__(self, reference, period=5, bad=3):
        self.ref = {r: toks[0] for r, (toks, _) in reference.items()}
        self.period, self.bad = period, bad

    def __call__(self, logits, seqs):
        toks = []
        for s in seqs:
            j = s.num_output_tokens + len(s.spec_token_ids)  # output index the draft guesses
            ref = self.ref[s.request.request_id]
            t = ref[j] if j < len(ref) else 0
            if j % self.period == self.bad:
                t = (t + 1) % logits.shape[1]
            toks.append(t)
        return toks, [None] * len(seqs)


def use_drafter(monkeypatch, fn) -> None:
    """Route MTPProposer._sample(logits, seqs) -> (tokens, draft probs or None) to `fn`."""
    monkeypatch.setattr(MTPProposer, "_sample", lambda self, logits, seqs: fn(logits, seqs))


CASES = {
    "batched": dict(max_num_seqs=8),
    "budget5": dict(max_num_seqs=3, max_num_batched_tokens=5, block_size=4),
    "budget2": dict(max_num_seqs=2, max_num_batched_tokens=2, block_size=2),
}


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("drafter", ["mtp", "scripted"])
def test_greedy_identical_to_plain(model, prompts, reference, monkeypatch, k, case, drafter):
    if drafter == "scripted":
        use_drafter(monkeypatch, ScriptedDrafts(reference))
    eng = make_engine(model, k, **CASES[case])
    got = run(eng, prompts, GREEDY, arrivals=[0, 0, 1, 2, 2, 5, 6])
    assert got == reference
    st = eng.stats["spec_decode"]
    assert st["num_verifies"] > 0
    if drafter == "scripted" and case == "batched":
        # every 5th draft is wrong: runs of 3 accepted tokens are common
        assert st["acceptance_rate"] > 0.6 and st["accepted_per_pos"][k - 1] > 0
    assert_pools_empty(eng)


@pytest.mark.parametrize("k", [2, 3])
def test_preemption_and_forks(model, prompts, reference, monkeypatch, k):
    use_drafter(monkeypatch, ScriptedDrafts(reference, period=4, bad=2))
    bs = 4
    need = max(-(-(n + MAX_NEW + k) // bs) for n in LENGTHS)
    eng = make_engine(model, k, max_num_seqs=4, max_num_batched_tokens=40, block_size=bs,
                      kv_cache_memory_bytes=kv_budget(model, k, bs, 4, need + 8))
    params = [SamplingParams(n=2 if i % 3 == 0 else 1, temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
              for i in range(len(prompts))]
    got = run(eng, prompts, params)
    assert eng.scheduler.num_preemptions > 0
    for r, (toks, _) in got.items():
        assert toks == reference[r][0] * len(toks)
    assert_pools_empty(eng)


def test_stops_inside_an_accepted_run(model, prompts, reference, monkeypatch):
    ps = []
    for i, (toks, _) in enumerate(reference.values()):
        kind = i % 3
        if kind == 0:  # a stop token in the middle of what will be an accepted run
            ps.append(SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[toks[0][5]]))
        elif kind == 1:
            ps.append(SamplingParams(temperature=0, max_tokens=4 + i % 4, ignore_eos=True))
        else:
            ps.append(SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=3, stop_token_ids=[toks[0][1]]))
    plain = run(make_engine(model, max_num_seqs=8), prompts, ps)
    use_drafter(monkeypatch, ScriptedDrafts(plain, period=100, bad=99))  # all drafts right
    eng = make_engine(model, 3, max_num_seqs=8)
    assert run(eng, prompts, ps) == plain
    # the runs really were accepted (drafts past a stop are not)
    assert eng.stats["spec_decode"]["acceptance_rate"] > 0.75
    assert_pools_empty(eng)


def test_logit_bias_greedy_identical_to_plain(model, prompts, reference):
    # ban each prompt's first two greedy tokens and favour one token: the outputs change, and the
    # target (verify) and the MTP drafts must see the same biased logits
    V = model.config.vocab_size
    bias = {t: -100.0 for toks, _ in reference.values() for t in toks[0][:2]}
    bias[V // 2] = 3.0
    p = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logit_bias=bias)
    plain = run(make_engine(model, max_num_seqs=8), prompts, p)
    assert plain != reference and not any(set(toks[0]) & {t for t, b in bias.items() if b < 0}
                                           for toks, _ in plain.values())
    eng = make_engine(model, 2, max_num_seqs=8)
    assert run(eng, prompts, p) == plain
    assert eng.stats["spec_decode"]["num_verifies"] > 0
    # a +100 bias forces the token in the target and (only if they see it too) in the drafts
    eng = make_engine(model, 2, max_num_seqs=8)
    forced = run(eng, prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True,
                                              logit_bias={V // 2: 100.0}))
    assert all(toks[0] == [V // 2] * MAX_NEW for toks, _ in forced.values())
    assert eng.stats["spec_decode"]["acceptance_rate"] == 1.0
    with pytest.raises(ValueError, match="logit_bias"):
        eng.add_request("x", [1, 2], SamplingParams(logit_bias={V: 1.0}))
    assert_pools_empty(eng)


def test_abort_and_logprobs(model, prompts, reference, monkeypatch):
    use_drafter(monkeypatch, ScriptedDrafts(reference))
    p = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2)
    plain_eng, eng = make_engine(model, max_num_seqs=8), make_engine(model, 2, max_num_seqs=8)
    outs = []
    for e in (plain_eng, eng):
        e.add_request("3", prompts[3], p)  # ids as in `reference` (the scripted drafts)
        e.add_request("4", prompts[4], p)
        lps = []
        for step in range(40):
            if step == 3:
                e.abort_request("4")
            for o in e.step():
                if o.request_id == "3":
                    lps += o.outputs[0].logprobs
            if not e.has_unfinished_requests():
                break
        outs.append(lps)
        assert_pools_empty(e)
    assert len(outs[0]) == len(outs[1]) == MAX_NEW
    for a, b in zip(*outs):
        assert a.keys() == b.keys()
        assert all(math.isclose(a[t].logprob, b[t].logprob, abs_tol=1e-4) for t in a)


def test_refuses_without_mtp_head(tiny_ckpt):
    m, _ = load_model(tiny_ckpt, dtype=torch.float32, device="cpu", with_mtp=False, progress=False)
    with pytest.raises(ValueError, match="MTP"):
        make_engine(m, 2)


# ---- sampling: the output distribution is the target's -----------------------------------------
TOP_K, LEN_S = 3, 3


@torch.inference_mode()
def exact_paths(model, prompt, params, seq_factory):
    """The target's probability of every LEN_S-token continuation (top_k leaves TOP_K per step)."""
    probs: dict[tuple, float] = {(): 1.0}
    out = {}
    frontier = [()]
    for depth in range(LEN_S):
        nxt = []
        for path in frontier:
            ids = torch.tensor(prompt + list(path))
            h = model(ids, torch.arange(len(ids)), ForwardBatch.full([len(ids)]))
            seq = seq_factory(list(path))
            p = final_probs(adjusted_logits(model.compute_logits(h[-1:]), [seq], [[]]), [seq])[0]
            for t in torch.nonzero(p).flatten().tolist():
                probs[path + (t,)] = probs[path] * float(p[t])
                nxt.append(path + (t,))
        frontier = nxt
    for path in frontier:
        out[path] = probs[path]
    return out


def test_sampling_matches_the_target_distribution(model, prompts, monkeypatch):
    from qwen3next.engine.sequence import Request, Sequence

    prompt = prompts[2]
    # penalties that favour repeats: verify position i must count the drafts before it as outputs
    # and a logit_bias on every 7th token id (before the penalties, in target and exact paths alike)
    params = SamplingParams(temperature=0.8, top_k=TOP_K, max_tokens=LEN_S, ignore_eos=True,
                            repetition_penalty=1.5, presence_penalty=-2.0, frequency_penalty=-2.0,
                            logit_bias={t: 1.5 for t in range(0, model.config.vocab_size, 7)})

    def seq_factory(outputs):
        s = Sequence(0, Request("x", prompt, params, frozenset(), 999), 0, torch.device("cpu"))
        s.token_ids += outputs
        return s

    exact = exact_paths(model, prompt, params, seq_factory)
    support = {}
    for path in exact:  # tokens the target allows after each prefix
        for j in range(LEN_S):
            support.setdefault(path[:j], set()).add(path[j])
    g = torch.Generator().manual_seed(5)
    V = model.config.vocab_size

    def drafter(logits, seqs):
        # q: uniform over the target's support plus one token outside it (often rejected)
        toks, probs = [], []
        for s in seqs:
            prefix = tuple(s.output_token_ids + s.spec_token_ids)
            allowed = sorted(support.get(prefix, {0})) + [V - 1]
            q = torch.zeros(V)
            q[allowed] = 1.0 / len(allowed)
            t = int(torch.multinomial(q, 1, generator=g))
            toks.append(t)
            probs.append(q)
        return toks, probs

    use_drafter(monkeypatch, drafter)
    eng = make_engine(model, 2, max_num_seqs=64, seed=1)
    N = 1600
    counts = dict.fromkeys(exact, 0)
    got = run(eng, [prompt] * N, params)
    for toks, _ in got.values():
        assert tuple(toks[0]) in counts, f"{toks[0]} has probability 0 under the target"
        counts[tuple(toks[0])] += 1
    st = eng.stats["spec_decode"]
    assert 0.2 < st["acceptance_rate"] < 0.9  # both accepts and rejects happen
    stat = sum((counts[p] - N * e) ** 2 / (N * e) for p, e in exact.items())
    df = len(exact) - 1
    assert stat < df + 4 * math.sqrt(2 * df), (stat, df)


# ---- front doors: LLM(...) and the CLI's --speculative-config ----------------------------------
def test_llm_and_cli_take_the_speculative_config(tiny_ckpt):
    import argparse

    from qwen3next import LLM
    from qwen3next.api.engine_setup import build_engine

    kw = dict(model=tiny_ckpt, dtype="float32", device="cpu", max_model_len=128, max_num_seqs=4)
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = ["The quick brown fox", "Hello there"]
    plain = [o.outputs[0].text for o in LLM(**kw).generate(prompts, p)]
    llm = LLM(**kw, speculative_config={"method": "qwen3_next_mtp", "num_speculative_tokens": 2})
    assert [o.outputs[0].text for o in llm.generate(prompts, p)] == plain
    assert llm.llm_engine.stats["spec_decode"]["num_verifies"] > 0
    ns = argparse.Namespace(model=tiny_ckpt, dtype="float32", device="cpu", max_model_len=128,
                            speculative_config='{"method": "qwen3_next_mtp", "num_speculative_tokens": 3}')
    engine, _ = build_engine(ns)
    assert engine.spec is not None and engine.spec.k == 3 and engine.model.mtp is not None
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        LLM(**kw, speculative_config={"method": "qwen3_next_mtp", "num_speculative_tokens": 9})


def test_seeded_sampling_does_not_depend_on_the_batch(model, prompts):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=MAX_NEW, ignore_eos=True, seed=11)
    other = SamplingParams(temperature=0.7, max_tokens=MAX_NEW, ignore_eos=True)
    alone = run(make_engine(model, 3, max_num_seqs=4), [prompts[4]], seeded)["0"]
    mixed = run(make_engine(model, 3, max_num_seqs=4), [prompts[4], prompts[5], prompts[1]], [seeded, other, other])
    assert mixed["0"] == alone


def test_disable_by_batch_size(model, prompts, reference, monkeypatch):
    use_drafter(monkeypatch, ScriptedDrafts(reference))
    spec = {"method": "qwen3_next_mtp", "num_speculative_tokens": 2, "disable_by_batch_size": 2}
    eng = LLMEngine(model, EngineArgs(max_num_seqs=8, max_model_len=256, speculative_config=spec), eos_token_ids=[])
    lens = (3, 5, MAX_NEW, MAX_NEW)  # four at once; no drafts until only two are left running
    got = {str(i): [] for i in range(4)}
    for i, m in enumerate(lens):
        eng.add_request(str(i), prompts[i], SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
    drafted_with = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            got[o.request_id] += o.outputs[0].token_ids
        running = eng.scheduler.running
        drafted_with += [len(running)] if any(s.spec_token_ids for s in running) else []
    assert [got[str(i)] for i in range(4)] == [reference[str(i)][0][0][:m] for i, m in enumerate(lens)]
    assert drafted_with and max(drafted_with) <= 2
    assert_pools_empty(eng)


def test_deferred_mtp_catch_up_drafts_as_if_never_deferred(model, prompts, reference, monkeypatch):
    """Above disable_by_batch_size no MTP forward runs; the positions it skipped are caught up
    when drafting resumes, so the MTP's draft logits equal those of an engine that never stopped."""
    seen: dict[int, dict] = {}

    def recording(tag):
        def fn(logits, seqs):
            for row, s in zip(logits, seqs):
                seen.setdefault(tag, {})[(s.request.request_id, s.num_output_tokens + len(s.spec_token_ids))] = row.clone()
            return logits.argmax(-1).tolist(), [None] * len(seqs)
        return fn

    lens = (3, 5, MAX_NEW, MAX_NEW)
    outs = {}
    for tag, off in ((0, None), (1, 2)):
        use_drafter(monkeypatch, recording(tag))
        spec = {"method": "qwen3_next_mtp", "num_speculative_tokens": 1, "disable_by_batch_size": off}
        eng = LLMEngine(model, EngineArgs(max_num_seqs=8, max_model_len=256, speculative_config=spec),
                        eos_token_ids=[])
        outs[tag] = run(eng, prompts[:4], [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in lens])
        assert_pools_empty(eng)
    assert outs[0] == outs[1]
    resumed = [key for key in seen[1] if key[0] in ("2", "3")]
    common = [key for key in resumed if key in seen[0]]
    assert len(common) >= 4 and min(j for _, j in common) >= 3  # drafts only after the first two finished
    for key in common:
        torch.testing.assert_close(seen[1][key], seen[0][key], atol=1e-4, rtol=1e-4)


def test_greedy_drafts_in_one_call_equal_step_by_step(model, prompts, monkeypatch):
    """Greedy drafting as one C++ call (catch-up + k draft steps) proposes exactly the drafts of the
    step-by-step loop, step for step, including rows whose k is cut near max_tokens."""
    from qwen3next.kernels import cpu_ext

    if cpu_ext.get() is None:
        pytest.skip("the C++ CPU kernels are not available")
    calls = []
    real = cpu_ext.mtp_draft_greedy
    monkeypatch.setattr(cpu_ext, "mtp_draft_greedy", lambda *a: (calls.append(1), real(*a))[1])
    engs = [make_engine(model, 3, max_num_seqs=4) for _ in range(2)]
    engs[1].spec.proposer._greedy_in_one_call = lambda *a: False
    for eng in engs:
        for i, m in enumerate((4, 7, MAX_NEW, MAX_NEW, 9)):
            eng.add_request(str(i), prompts[i], SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
    steps = 0
    while engs[0].has_unfinished_requests():
        outs = [[(o.request_id, o.outputs[0].token_ids) for o in e.step()] for e in engs]
        assert outs[0] == outs[1]
        drafts = [{s.request.request_id: s.spec_token_ids for s in e.scheduler.running} for e in engs]
        assert drafts[0] == drafts[1]
        steps += 1
    assert not engs[1].has_unfinished_requests() and steps > 5 and len(calls) >= steps - 2
    assert engs[0].spec.stats.as_dict() == engs[1].spec.stats.as_dict()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_verify_cuda_graphs_generate_the_eager_tokens(tiny_ckpt, prompts, monkeypatch):
    """On CUDA (by default; QWEN3NEXT_VERIFY_GRAPHS=0 switches it off) the verify forward replays a
    graph whenever every row brings k drafts; greedy outputs equal the eager engine's, and the
    graph path is taken."""
    from qwen3next.engine.cuda_graph import VerifyGraphRunner

    monkeypatch.delenv("QWEN3NEXT_VERIFY_GRAPHS", raising=False)

    gpu, _ = load_model(tiny_ckpt, dtype=torch.float32, device="cuda", with_mtp=True, progress=False)
    replays = []
    real_run = VerifyGraphRunner.run
    monkeypatch.setattr(VerifyGraphRunner, "run", lambda self, *a: (replays.append(1), real_run(self, *a))[1])
    outs = {}
    for eager in (True, False):
        spec = {"method": "qwen3_next_mtp", "num_speculative_tokens": 2}
        eng = LLMEngine(gpu, EngineArgs(max_num_seqs=4, max_model_len=256, speculative_config=spec,
                                        enforce_eager=eager), eos_token_ids=[])
        assert (eng.spec.verify_graphs is None) == eager
        outs[eager] = run(eng, prompts[:5], GREEDY)
        assert_pools_empty(eng)
    assert outs[True] == outs[False]
    assert replays
    monkeypatch.setenv("QWEN3NEXT_VERIFY_GRAPHS", "0")
    spec = {"method": "qwen3_next_mtp", "num_speculative_tokens": 2}
    eng = LLMEngine(gpu, EngineArgs(max_num_seqs=4, max_model_len=256, speculative_config=spec), eos_token_ids=[])
    assert eng.spec.verify_graphs is None
