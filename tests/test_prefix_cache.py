"""Prefix caching (engine/prefix_cache.py) on the tiny checkpoint (float32, CPU): greedy tokens and
logprobs equal to the engine without the cache for prompts sharing 0, 1 or several snapshot
boundaries (block_size 8, a snapshot every 16 tokens), a prompt ending exactly at a boundary or
shorter than one, a multi-turn follow-up (snapshot taken during decode), under eviction,
preemption and n > 1; aborts free every reference; prompt-logprobs requests bypass the cache;
the server reports usage.prompt_tokens_details.cached_tokens; with MTP speculative decoding the
MTP layer's KV after a hit equals the uncached engine's."""

from __future__ import annotations

import pytest
import torch

from qwen3next.engine import EngineArgs, LLMEngine
from qwen3next.engine.cache import bytes_per_block, bytes_per_slot
from qwen3next.loader import load_model
from qwen3next.sampling_params import SamplingParams

BS, SB = 8, 16


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    m, _ = load_model(tiny_ckpt, dtype=torch.float32, device="cpu", with_mtp=False, progress=False)
    return m


def rand(n: int, seed: int, V: int = 512) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine(model, on: bool, **knobs) -> LLMEngine:
    knobs.setdefault("max_model_len", 256)
    return LLMEngine(model, EngineArgs(block_size=BS, enable_prefix_caching=on, prefix_caching_state_block=SB,
                                       **knobs), eos_token_ids=[])


def drain(eng: LLMEngine) -> dict:
    """Step until idle -> request id -> ([tokens per sample], [logprobs per sample], cached)."""
    res: dict = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            toks, lps, _ = res.setdefault(o.request_id, ({}, {}, None))
            for c in o.outputs:
                toks.setdefault(c.index, []).extend(c.token_ids)
                if c.logprobs is not None:
                    lps.setdefault(c.index, []).extend(d[t].logprob for d, t in zip(c.logprobs, c.token_ids))
            res[o.request_id] = (toks, lps, o.num_cached_tokens)
    return {k: ([t[i] for i in sorted(t)], [lp[i] for i in sorted(lp)], c) for k, (t, lp, c) in res.items()}


def one_by_one(eng: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list:
    out = []
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
        out.append(drain(eng)[str(i)])
    return out


def assert_same(a: list, b: list) -> None:
    for (ta, la, _), (tb, lb, _) in zip(a, b):
        assert ta == tb
        for x, y in zip(la, lb):
            assert max(abs(u - v) for u, v in zip(x, y)) < 1e-4


GREEDY = SamplingParams(max_tokens=6, temperature=0, logprobs=1)


def test_hits_at_boundaries_match_the_uncached_engine(model):
    P = rand(45, 1)
    prompts = [P + rand(3, 2),  # cold: nothing to reuse
               P + rand(10, 3),  # shares 45 tokens: boundaries 16 and 32 -> resumes at 32
               P[:20] + rand(9, 4),  # shares 20: one boundary -> 16
               P[:32],  # ends exactly at a boundary: the last token is recomputed -> 16
               P[:33],  # -> 32
               P[:10],  # shorter than a boundary -> 0
               P[:3] + rand(40, 5)]  # shares less than a block -> 0
    off = one_by_one(engine(model, False), prompts, GREEDY)
    eng = engine(model, True)
    on = one_by_one(eng, prompts, GREEDY)
    assert_same(off, on)
    assert [c for _, _, c in on] == [0, 32, 16, 16, 32, 0, 0]
    assert all(c == 0 for _, _, c in off)
    st = eng.stats["prefix_cache"]
    assert st["hit_tokens"] == 96 and st["queried_tokens"] == sum(map(len, prompts))
    c = eng.cache
    assert all(r == 0 for r in c._refs) and c.num_free_blocks == c.plan.num_blocks


def test_follow_up_turn_reuses_the_decoded_answer(model):
    """A multi-turn follow-up (old prompt + answer + more): the state snapshot the first request
    took while decoding across a boundary lets the second resume after part of the answer."""
    first = rand(20, 6)
    params = SamplingParams(max_tokens=30, temperature=0, logprobs=1)
    runs = []
    for on in (False, True):
        eng = engine(model, on)
        (toks, _, _), = one_by_one(eng, [first], params)
        # prompt 20 + 29 computed outputs: decode passed the boundaries 32 and 48
        runs.append(one_by_one(eng, [first + toks[0] + rand(7, 7)], params))
    assert_same(runs[0], runs[1])
    assert runs[1][0][2] == 48


def test_chunked_prefill_off_and_concurrent_arrivals(model):
    P = rand(40, 8)
    prompts = [P + rand(k, 10 + k) for k in (5, 9, 13)]
    ref = one_by_one(engine(model, False), prompts, GREEDY)
    eng = engine(model, True, enable_chunked_prefill=False, max_num_batched_tokens=256)
    # no chunk ends at a boundary inside a prompt: the snapshot at 32 is this prompt's end
    one_by_one(eng, [P[:32]], GREEDY)
    for i, p in enumerate(prompts):  # all at once: each hits the first request's prefix
        eng.add_request(str(i), p, GREEDY)
    out = drain(eng)
    assert_same(ref, [out[str(i)] for i in range(3)])
    assert [out[str(i)][2] for i in range(3)] == [32, 32, 32]


def budget(model, slots: int, blocks: int, snaps: int) -> tuple[int, float]:
    """(bytes, snapshot fraction) that plan `slots` sequence slots, `snaps` snapshot slots and
    `blocks` KV blocks."""
    spec, f32 = model.state_spec(), torch.float32
    per_slot, per_block = bytes_per_slot(spec, f32), bytes_per_block(spec, BS, f32)
    total = (slots + snaps) * per_slot + blocks * per_block
    return total, (snaps + 0.5) * per_slot / total


@pytest.mark.parametrize("concurrent", [False, True])
def test_eviction_and_preemption_keep_outputs(model, concurrent):
    """A cache of 22 blocks and 6 snapshot slots: cached blocks and snapshots are evicted
    (and, concurrently, sequences preempted) and the outputs still equal the uncached engine's."""
    P, Q = rand(50, 20), rand(50, 21)
    prompts = [base + rand(k, 30 + k) for k in (4, 11, 17) for base in (P, Q)] * 2
    kv, fraction = budget(model, 3, 22, 6)
    knobs = dict(max_num_seqs=3, kv_cache_memory_bytes=kv, prefix_caching_state_fraction=fraction)
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=1)
    ref = one_by_one(engine(model, False, **knobs), prompts, params)
    eng = engine(model, True, **knobs)
    assert (eng.cache.plan.num_snapshot_slots, eng.cache.plan.num_blocks) == (6, 22)
    if concurrent:
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, params)
        res = drain(eng)
        out = [res[str(i)] for i in range(len(prompts))]
        assert eng.scheduler.num_preemptions > 0
    else:
        out = one_by_one(eng, prompts, params)
    assert_same(ref, out)
    st = eng.stats["prefix_cache"]
    assert st["evicted_blocks"] > 0 and st["hit_tokens"] > 0
    c = eng.cache
    assert all(r == 0 for r in c._refs) and c.num_free_blocks == c.plan.num_blocks


def test_n_samples_share_a_cached_prefix(model):
    P = rand(40, 40)
    params = SamplingParams(n=3, max_tokens=8, temperature=0.8, seed=5, logprobs=1)
    runs = []
    for on in (False, True):
        eng = engine(model, on)
        runs.append(one_by_one(eng, [P + rand(3, 41), P + rand(6, 42)], params))
    assert_same(runs[0], runs[1])
    assert [c for _, _, c in runs[1]] == [0, 32]
    assert len(set(map(tuple, runs[1][1][0]))) > 1  # the samples differ


def test_abort_frees_references_and_keeps_the_cache(model):
    P = rand(60, 50)
    eng = engine(model, True)
    one_by_one(eng, [P], GREEDY)
    for i in range(3):
        eng.add_request(f"a{i}", P + rand(5, 51 + i), SamplingParams(max_tokens=20, n=2, temperature=1.0))
    for _ in range(3):
        eng.step()
    assert any(r > 1 for r in eng.cache._refs)  # prefix blocks shared by the running sequences
    for i in range(3):
        eng.abort_request(f"a{i}")
    eng.step()
    c = eng.cache
    assert all(r == 0 for r in c._refs) and c.num_free_blocks == c.plan.num_blocks
    assert c.num_free_slots == c.scratch_base and not eng.has_unfinished_requests()
    eng.add_request("again", P + rand(2, 60), GREEDY)
    assert drain(eng)["again"][2] == 48


def test_prompt_logprobs_requests_compute_every_position(model):
    P = rand(40, 70)
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1)
    lps = []
    for on in (False, True):
        eng = engine(model, on)
        one_by_one(eng, [P], GREEDY)
        eng.add_request("p", P + rand(4, 71), params)
        outs = []
        while eng.has_unfinished_requests():
            outs += eng.step()
        assert outs[0].num_cached_tokens == 0
        lps.append([None if d is None else max(v.logprob for v in d.values()) for d in outs[0].prompt_logprobs])
    assert len(lps[1]) == 44 and lps[1][0] is None
    assert max(abs(a - b) for a, b in zip(lps[0][1:], lps[1][1:])) < 1e-4


def test_bad_knobs_are_one_line_errors():
    with pytest.raises(ValueError, match="enable_prefix_caching with speculative_config needs tensor_parallel_size 1"):
        EngineArgs(enable_prefix_caching=True, speculative_config={"num_speculative_tokens": 1},
                   tensor_parallel_size=2)
    with pytest.raises(ValueError, match="prefix_caching_state_block"):
        EngineArgs(enable_prefix_caching=True, block_size=16, prefix_caching_state_block=40)
    with pytest.raises(ValueError, match="prefix_caching_state_fraction"):
        EngineArgs(enable_prefix_caching=True, prefix_caching_state_fraction=1.5)
    assert EngineArgs(speculative_config={"num_speculative_tokens": 1}).enable_prefix_caching is False
    # the default snapshot spacing follows block_size: a block size not dividing 256 works, cache on or off
    assert EngineArgs(block_size=24).prefix_caching_state_block == 264
    assert EngineArgs(block_size=512, enable_prefix_caching=True).prefix_caching_state_block == 512
    assert EngineArgs().prefix_caching_state_block == 256


def test_too_small_a_budget_names_the_snapshot_slots(model):
    from qwen3next.engine.cache import plan_cache

    slot = bytes_per_slot(model.state_spec(), torch.float32)
    with pytest.raises(ValueError, match="4 state slots \\+ 1 prefix-caching snapshot slots"):
        plan_cache(model.state_spec(), torch.float32, BS, 4, 5 * slot, snapshot_fraction=0.1, state_block=SB)


def test_llm_takes_the_other_engine_fields(tiny_ckpt):
    from qwen3next import LLM

    llm = LLM(tiny_ckpt, max_model_len=256, enable_prefix_caching=True, prefix_caching_state_block=32,
              enforce_eager=True)
    assert llm.llm_engine.cache.prefix.state_block == 32
    with pytest.raises(ValueError, match="unknown option.*prefix_cache_block"):
        LLM(tiny_ckpt, prefix_cache_block=32)


def test_server_usage_reports_cached_tokens(tiny_ckpt):
    import httpx

    from tests.helpers.server_harness import ServerHarness

    h = ServerHarness(tiny_ckpt, "--enable-prefix-caching", "--prefix-caching-state-block", "96",
                      "--max-model-len", "512")
    try:
        prompt = rand(300, 80)
        body = {"model": tiny_ckpt, "prompt": prompt, "max_tokens": 3, "temperature": 0}
        first = httpx.post(h.url + "/v1/completions", json=body, timeout=60).json()["usage"]
        again = httpx.post(h.url + "/v1/completions", json=body, timeout=60).json()["usage"]
        assert first.get("prompt_tokens_details") is None
        # the last snapshot boundary before the last prompt token: 3 * 96
        assert again["prompt_tokens"] == 300 and again["prompt_tokens_details"] == {"cached_tokens": 288}
        msgs = [{"role": "user", "content": "hello " * 100}]
        chat = {"model": tiny_ckpt, "messages": msgs, "max_tokens": 3}
        httpx.post(h.url + "/v1/chat/completions", json=chat, timeout=60)
        usage = httpx.post(h.url + "/v1/chat/completions", json=chat, timeout=60).json()["usage"]
        chat_hit = (usage["prompt_tokens"] - 1) // 96 * 96
        assert chat_hit > 0 and usage["prompt_tokens_details"]["cached_tokens"] == chat_hit
        assert h.wait_idle()
        h.state.engine._update_snapshot()  # (the thread engine refreshes it after each step)
        metrics = httpx.get(h.url + "/metrics", timeout=10).text
        assert f'qwen3next:prefix_cache_hits_total{{model_name="{tiny_ckpt}"}} {288 + chat_hit}.0' in metrics
        # tool_choice "required" on the Thinking template (api/forced_tools: reason, then the call)
        # reports the cached tokens of its phase-1 request too
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
        forced = {**chat, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "tools": [tool],
                  "tool_choice": "required"}
        for _ in range(2):
            h.push("x", "</think>")
            h.push('f", "arguments": {}}\n', "</tool_call>")
            r = httpx.post(h.url + "/v1/chat/completions", json=forced, timeout=60).json()
            assert "choices" in r, r
            assert r["choices"][0]["finish_reason"] == "tool_calls"
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == (r["usage"]["prompt_tokens"] - 1) // 96 * 96
    finally:
        h.close()


def test_decode_snapshots_give_way_before_prompt_ones():
    """A long answer passes many boundaries: each earlier decode-time snapshot goes to the front of
    the LRU, so a prompt's snapshot survives and the answer's last one is kept."""
    from types import SimpleNamespace

    from qwen3next.engine.prefix_cache import PrefixCache

    pc = PrefixCache(BS, SB, num_blocks=64, snap_base=4, num_snaps=3)

    def seq(tokens, prompt_len):
        return SimpleNamespace(token_ids=tokens, num_prompt_tokens=prompt_len, block_hashes=[],
                               num_registered=0, num_computed_tokens=0, block_ids=list(range(len(tokens) // BS)))

    a = seq(rand(20, 90), 20)
    a.num_computed_tokens = 16  # a prompt chunk ending at a boundary
    p_key = pc.register(a)
    pc.snapshot_slot(p_key)
    b = seq(rand(70, 91), 5)
    for c in range(6, 66):  # decoding across the boundaries 16, 32, 48, 64
        b.num_computed_tokens = c
        key = pc.register(b)
        if key is not None:
            pc.snapshot_slot(key)
    assert p_key in pc.snapshots and b.block_hashes[64 // BS - 1] in pc.snapshots


@pytest.mark.parametrize("defer", [False, True])
def test_mtp_speculative_decoding_after_a_hit(tiny_ckpt, defer):
    """The hit's last shared position gets its MTP KV from the stored trunk hidden row and this
    request's own next token (the prompts differ right after the boundary), also when the MTP
    catch-up is deferred (disable_by_batch_size): MTP KV and outputs equal the uncached engine's."""
    m, _ = load_model(tiny_ckpt, dtype=torch.float32, device="cpu", with_mtp=True, progress=False)
    P, B = rand(45, 100), None
    spec = {"num_speculative_tokens": 2, **({"disable_by_batch_size": 1} if defer else {})}
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=1)
    L = m.config.num_hidden_layers  # the MTP layer's KV index
    runs = []
    for on in (False, True):
        eng = engine(m, on, speculative_config=spec)
        one_by_one(eng, [P], params)
        B = P[:32] + rand(9, 101)
        if defer:  # two running sequences: above disable_by_batch_size, the catch-up waits
            eng.add_request("other", rand(20, 102), SamplingParams(max_tokens=4, temperature=0))
        eng.add_request("b", B, params)
        seq = eng.requests["b"].seqs[0]
        outs = []
        for _ in range(12):  # until the other request ended and the catch-up caught up
            outs += eng.step()
            if not seq.mtp_pending and "other" not in eng.requests and seq.num_computed_tokens >= 41:
                break
        assert not seq.mtp_pending and seq.num_computed_tokens >= 41
        kv = eng.cache.cache.kv[L]
        runs.append((torch.stack([kv[seq.block_ids[p // BS], :, p % BS] for p in range(41)]),
                     outs + [o for o in drain_outputs(eng)], eng.stats.get("prefix_cache")))
    (kv_off, outs_off, _), (kv_on, outs_on, st) = runs
    assert st["hit_tokens"] == 32
    assert torch.allclose(kv_off, kv_on, atol=1e-5)
    toks = [[t for o in outs if o.request_id == "b" for t in o.outputs[0].token_ids] for outs in (outs_off, outs_on)]
    assert toks[0] == toks[1] and len(toks[0]) == 10


def test_mtp_seeded_sampling_after_a_hit_of_all_but_one_token(tiny_ckpt):
    """A hit that leaves one prompt token to compute (P[:33] after P: resumes at 32) samples the
    first token as the prompt's last chunk, and a prompt row draws as a draft-less verify row:
    a seeded request gets the tokens it gets without the cache."""
    m, _ = load_model(tiny_ckpt, dtype=torch.float32, device="cpu", with_mtp=True, progress=False)
    P = rand(45, 110)
    params = SamplingParams(max_tokens=8, temperature=0.9, seed=3)
    runs = [one_by_one(engine(m, on, speculative_config={"num_speculative_tokens": 2}), [P, P[:33]], params)
            for on in (False, True)]
    assert [c for _, _, c in runs[1]] == [0, 32]
    assert_same(runs[0], runs[1])
    # n=2 with one sequence at a time: sample 1 is recomputed (prompt + its first token) after
    # sample 0; with the cache its last chunk is that one token (a verify row), without it the
    # whole 33: both draw alike
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=4, n=2)
    runs = [one_by_one(engine(m, on, speculative_config={"num_speculative_tokens": 2}, max_num_seqs=1), [P[:32]],
                       params) for on in (False, True)]
    assert_same(runs[0], runs[1])


def drain_outputs(eng: LLMEngine) -> list:
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    return outs


def test_two_ranks_replay_the_snapshot_copies(tiny_ckpt):
    """Under tensor parallelism the snapshot and restore copies are replayed by the worker."""
    from qwen3next import LLM

    P = rand(300, 110)
    prompts = [{"prompt_token_ids": P + rand(5, 111 + i)} for i in range(2)]
    kw = dict(dtype="float32", device="cpu", max_model_len=512, max_num_seqs=2)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ref = [LLM(model=tiny_ckpt, **kw).generate([p], greedy)[0].outputs[0].token_ids for p in prompts]
    llm = LLM(model=tiny_ckpt, tensor_parallel_size=2, enable_prefix_caching=True, **kw)
    try:
        outs = [llm.generate([p], greedy)[0] for p in prompts]
        assert [o.outputs[0].token_ids for o in outs] == ref
        assert [o.num_cached_tokens for o in outs] == [0, 256]
    finally:
        llm.llm_engine.shutdown()
