"""LLMEngine on the tiny checkpoint (float32, CPU): greedy parity with transformers' generate and
with one-request-at-a-time runs, under chunked prefill at every boundary, preemption, arrivals
mid-run and n > 1 forks; aborts and finished requests leave the block and slot pools empty."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3next.engine import EngineArgs, LLMEngine
from qwen3next.engine.cache import bytes_per_block, bytes_per_slot
from qwen3next.loader import load_model
from qwen3next.sampling_params import SamplingParams

LENGTHS = [1, 2, 5, 16, 17, 40, 64, 65, 130, 300]
MAX_NEW = 8


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    m, _ = load_model(tiny_ckpt, dtype=torch.float32, device="cpu", with_mtp=False, progress=False)
    return m


@pytest.fixture(scope="module")
def prompts(model):
    g = torch.Generator().manual_seed(7)
    V = model.config.vocab_size
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def hf_greedy(tiny_ckpt, prompts):
    """transformers' greedy generate, one prompt at a time, EOS off."""
    from transformers import Qwen3NextForCausalLM

    hf = Qwen3NextForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                              do_sample=False, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


def kv_budget(model, block_size: int, num_slots: int, num_blocks: int) -> int:
    spec = model.state_spec()
    f32 = torch.float32
    return num_slots * bytes_per_slot(spec, f32) + num_blocks * bytes_per_block(spec, block_size, f32)


def make_engine(model, **knobs) -> LLMEngine:
    knobs.setdefault("max_model_len", 512)
    return LLMEngine(model, EngineArgs(**knobs), eos_token_ids=[])


def run(engine: LLMEngine, prompts, params, arrivals=None) -> dict[str, list[list[int]]]:
    """Drive the engine to completion; request i joins before step arrivals[i]. -> id -> tokens per sample."""
    arrivals = arrivals or [0] * len(prompts)
    params = params if isinstance(params, list) else [params] * len(prompts)
    got: dict[str, dict[int, list[int]]] = {}
    step = 0
    while True:
        for i, p in enumerate(prompts):
            if arrivals[i] == step:
                engine.add_request(str(i), p, params[i])
                got[str(i)] = {}
        if step > max(arrivals) and not engine.has_unfinished_requests():
            break
        for out in engine.step():
            for c in out.outputs:
                got[out.request_id].setdefault(c.index, []).extend(c.token_ids)
        check_pools(engine)
        step += 1
    return {r: [d[k] for k in sorted(d)] for r, d in got.items()}


def check_pools(engine: LLMEngine) -> None:
    """Every block is free xor referenced by exactly its holders; running sequences own distinct
    slots whose block-table rows list their blocks; waiting ones hold nothing."""
    c, sch = engine.cache, engine.scheduler
    holders = [0] * c.plan.num_blocks
    for seq in sch.running:
        for b in seq.block_ids:
            holders[b] += 1
        assert len(seq.block_ids) >= c.blocks_needed(seq.num_computed_tokens)
        assert c.block_tables[seq.slot, :len(seq.block_ids)].tolist() == seq.block_ids
    assert holders == c._refs
    assert sorted(c._free_blocks) == [b for b, n in enumerate(holders) if n == 0]
    slots = [seq.slot for seq in sch.running]
    assert len(set(slots)) == len(slots) and -1 not in slots
    assert len(c._free_slots) + len(slots) == c.scratch_base
    assert all(not s.block_ids and s.slot == -1 and s.num_computed_tokens == 0 for s in sch.waiting)


def assert_pools_empty(engine: LLMEngine) -> None:
    c = engine.cache
    assert c.num_free_blocks == c.plan.num_blocks
    assert c.num_free_slots == c.scratch_base
    assert all(r == 0 for r in c._refs)
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine.requests


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.mark.parametrize("knobs", [
    dict(max_num_seqs=4, max_num_batched_tokens=512),
    dict(max_num_seqs=3, max_num_batched_tokens=11, block_size=4),  # chunks cut at every offset
    dict(max_num_seqs=2, max_num_batched_tokens=1, block_size=1, only=5),  # one token per step
    dict(max_num_seqs=8, max_num_batched_tokens=512, enable_chunked_prefill=False),  # whole prompts
], ids=["batched", "chunked11", "chunked1", "unchunked"])
def test_greedy_matches_transformers(model, prompts, hf_greedy, knobs):
    knobs = dict(knobs)
    k = knobs.pop("only", len(prompts))
    eng = make_engine(model, **knobs)
    got = run(eng, prompts[:k], GREEDY)
    assert [got[str(i)][0] for i in range(k)] == hf_greedy[:k]
    assert_pools_empty(eng)


def test_preemption_recomputes_and_matches(model, prompts, hf_greedy):
    # room for ~1.3 of the longest sequences: running ones must be preempted and recomputed
    bs = 8
    eng = make_engine(model, max_num_seqs=4, max_num_batched_tokens=64, block_size=bs,
                      kv_cache_memory_bytes=kv_budget(model, bs, 4, 52))
    got = run(eng, prompts, GREEDY)
    assert eng.scheduler.num_preemptions > 0
    assert [got[str(i)][0] for i in range(len(prompts))] == hf_greedy
    assert_pools_empty(eng)


def test_one_at_a_time_equals_batched(model, prompts):
    single = make_engine(model, max_num_seqs=1)
    ref = run(single, prompts[:6], GREEDY)
    eng = make_engine(model, max_num_seqs=6, max_num_batched_tokens=24, block_size=4)
    assert run(eng, prompts[:6], GREEDY, arrivals=[0, 3, 3, 5, 9, 12]) == ref


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_random_arrivals_and_budgets(model, prompts, hf_greedy, data):
    k = data.draw(st.integers(2, 5), label="num requests")
    which = data.draw(st.lists(st.sampled_from(range(8)), min_size=k, max_size=k), label="prompts")
    arrivals = data.draw(st.lists(st.integers(0, 12), min_size=k, max_size=k), label="arrivals")
    bs = data.draw(st.sampled_from([1, 2, 4, 16]), label="block_size")
    max_seqs = data.draw(st.integers(1, 4), label="max_num_seqs")
    tokens = data.draw(st.integers(1, 80), label="max_num_batched_tokens")
    longest = max(LENGTHS[i] for i in which) + MAX_NEW
    blocks = data.draw(st.integers(-(-longest // bs), 3 * -(-longest // bs)), label="kv blocks")
    ns = data.draw(st.lists(st.integers(1, 2), min_size=k, max_size=k), label="n per request")
    eng = make_engine(model, max_num_seqs=max_seqs, max_num_batched_tokens=tokens, block_size=bs,
                      kv_cache_memory_bytes=kv_budget(model, bs, max_seqs, blocks))
    params = [SamplingParams(n=n, temperature=0, max_tokens=MAX_NEW, ignore_eos=True) for n in ns]
    got = run(eng, [prompts[i] for i in which], params, arrivals=arrivals)
    assert [got[str(j)] for j in range(k)] == [[hf_greedy[i]] * n for i, n in zip(which, ns)]
    assert_pools_empty(eng)


def test_seeded_sampling_is_independent_of_the_batch(model, prompts):
    seeded = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=1234, max_tokens=8, ignore_eos=True)
    alone = run(make_engine(model), [prompts[3]], seeded)["0"]
    others = [SamplingParams(temperature=0.8, seed=None, max_tokens=n, ignore_eos=True) for n in (3, 12, 7)]
    crowd = run(make_engine(model, max_num_seqs=3, max_num_batched_tokens=9, block_size=2, seed=5),
                [prompts[5], prompts[3], prompts[0], prompts[7]], [others[0], seeded, others[1], others[2]],
                arrivals=[0, 2, 0, 4])["1"]
    assert alone == crowd
    other_seed = run(make_engine(model), [prompts[3]],
                     SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=99, max_tokens=8, ignore_eos=True))
    assert other_seed["0"] != alone


def test_n_samples_fork_equals_separate_requests(model, prompts):
    p = prompts[5]  # 40 tokens: the fork copies a partial block (block_size 16)
    params = SamplingParams(n=3, temperature=1.0, seed=10, max_tokens=8, ignore_eos=True)
    eng = make_engine(model, max_num_seqs=4)
    forked = run(eng, [p], params)["0"]
    assert_pools_empty(eng)
    separate = [run(make_engine(model), [p], SamplingParams(temperature=1.0, seed=10 + i, max_tokens=8,
                                                            ignore_eos=True))["0"][0] for i in range(3)]
    assert forked == separate
    # greedy samples are all equal; the fork also works when slots run out (children recompute)
    tight = make_engine(model, max_num_seqs=1)
    g = run(tight, [p], SamplingParams(n=3, temperature=0, max_tokens=6, ignore_eos=True))["0"]
    assert g[0] == g[1] == g[2]
    assert_pools_empty(tight)


def test_abort_frees_everything(model, prompts):
    eng = make_engine(model, max_num_seqs=2, max_num_batched_tokens=16, block_size=4)
    for i in range(4):
        eng.add_request(f"r{i}", prompts[6 + i % 3], SamplingParams(n=2, temperature=0.5, max_tokens=50))
    for _ in range(6):
        eng.step()
    assert eng.cache.num_free_blocks < eng.cache.plan.num_blocks
    for i in range(4):
        eng.abort_request(f"r{i}")
    eng.abort_request("unknown")  # ignored
    outs = eng.step()
    assert sorted(o.request_id for o in outs) == [f"r{i}" for i in range(4)]
    assert all(o.finished and {c.finish_reason for c in o.outputs} == {"abort"} for o in outs)
    assert not eng.has_unfinished_requests()
    assert_pools_empty(eng)


def test_stop_rules(model, prompts):
    eng = make_engine(model)
    ref = run(eng, [prompts[4]], GREEDY)["0"][0]
    stop_tok = ref[4]
    first = ref.index(stop_tok)
    eng2 = LLMEngine(model, EngineArgs(max_model_len=512), eos_token_ids=[stop_tok])
    eng2.add_request("eos", prompts[4], SamplingParams(temperature=0, max_tokens=MAX_NEW))
    eng2.add_request("ids", prompts[4], SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True,
                                                       stop_token_ids=[stop_tok]))
    eng2.add_request("ign", prompts[4], SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
    final = {}
    while eng2.has_unfinished_requests():
        for o in eng2.step():
            c = o.outputs[0]
            final.setdefault(o.request_id, []).extend(c.token_ids)
            if o.finished:
                final[o.request_id + ".why"] = (c.finish_reason, c.stop_reason)
    assert final["eos"] == ref[: first + 1] and final["eos.why"] == ("stop", None)
    assert final["ids"] == ref[: first + 1] and final["ids.why"] == ("stop", stop_tok)
    assert final["ign"] == ref and final["ign.why"] == ("length", None)


def test_startup_log_says_what_fits(model, caplog):
    with caplog.at_level("INFO", logger="qwen3next.engine"):
        make_engine(model, max_num_seqs=3, block_size=8, kv_cache_memory_bytes=kv_budget(model, 8, 3, 20))
    assert "20 KV blocks x 8 tokens = 160 tokens" in caplog.text and "3 state slots" in caplog.text


def test_refuses_requests_that_can_never_fit(model):
    bs = 4
    eng = make_engine(model, max_num_seqs=2, block_size=bs, kv_cache_memory_bytes=kv_budget(model, bs, 2, 10))
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request("a", [1] * 500, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="KV blocks"):
        eng.add_request("b", [1] * 30, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        eng.add_request("c", [], SamplingParams())
    with pytest.raises(ValueError, match="prompt_token_ids"):
        eng.add_request("d", [10**6], SamplingParams())
    eng.add_request("e", [1] * 30, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="request_id"):
        eng.add_request("e", [1], SamplingParams())
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):
        make_engine(model, kv_cache_memory_bytes=1000)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineArgs(max_num_seqs=0)
    with pytest.raises(ValueError, match="enable_chunked_prefill"):
        make_engine(model, max_num_batched_tokens=100, enable_chunked_prefill=False)


def test_corrupt_tokenizer_file_is_named(tmp_path):
    """A broken tokenizer.json in the model dir: a one-line error naming the file (tokenizers' own
    message says only 'key must be a string at line 1 column 2')."""
    from qwen3next.engine.llm_engine import tokenizer_size

    (tmp_path / "tokenizer.json").write_text("{bad")
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a valid tokenizer file"):
        tokenizer_size(str(tmp_path))


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 1.5])
def test_engine_seed_out_of_range_is_refused(seed):
    """EngineArgs(seed=) outside torch.manual_seed's range: a ValueError naming the field (the CLI's
    --seed 36893488147419103232 printed 'Overflow when unpacking long long')."""
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"):
        EngineArgs(seed=seed)
