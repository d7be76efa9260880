"""Engine-core audit (session 6) on the tiny checkpoint (float32, CPU): each test reproduces a
defect found by stressing the scheduler, the caches, prefix caching and MTP speculative decoding
with small pools, and checks the fixed engine against the plain one."""

from __future__ import annotations

import pytest
import torch

from qwen3next.engine import EngineArgs, LLMEngine
from qwen3next.engine.cache import bytes_per_block, bytes_per_slot
from qwen3next.loader import load_model
from qwen3next.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    m, _ = load_model(tiny_ckpt, dtype=torch.float32, device="cpu", with_mtp=True, progress=False)
    return m


def drain(eng: LLMEngine, max_steps: int = 200) -> dict[str, list[int]]:
    """Step until idle (failing instead of spinning forever) -> request id -> tokens of sample 0."""
    got: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not eng.has_unfinished_requests():
            return got
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.outputs[0].token_ids if o.outputs else [])
    raise AssertionError(f"no progress after {max_steps} steps: waiting {list(eng.scheduler.waiting)}")


def pools_empty(eng: LLMEngine) -> bool:
    c = eng.cache
    return c.num_free_blocks == c.plan.num_blocks and c.num_free_slots == c.scratch_base and not any(c._refs)


def test_mtp_prefix_hit_of_a_prompt_filling_the_whole_cache_is_admitted(model):
    """MTP + prefix caching: a hit copies its last block, and admission counted that copy on top
    of its source, which is evictable again right after. A prompt needing every KV block was
    refused forever on its second run (step() returned nothing, generate spun)."""
    bs, k, num_blocks = 8, 1, 4
    slot = bytes_per_slot(model.state_spec(), torch.float32)
    budget = (1 + k) * slot + num_blocks * bytes_per_block(model.state_spec(), bs, torch.float32) + 2 * slot
    eng = LLMEngine(model, EngineArgs(
        max_model_len=64, max_num_seqs=1, block_size=bs, kv_cache_memory_bytes=budget,
        enable_prefix_caching=True, prefix_caching_state_block=bs,
        prefix_caching_state_fraction=(2 * slot + 1) / budget,
        speculative_config={"num_speculative_tokens": k}), eos_token_ids=[])
    assert eng.cache.plan.num_blocks == num_blocks
    prompt = list(range(10, 10 + num_blocks * bs))  # every block of the cache
    params = SamplingParams(temperature=0, max_tokens=1)
    plain = LLMEngine(model, EngineArgs(max_model_len=64), eos_token_ids=[])
    plain.add_request("p", prompt, params)
    want = drain(plain)["p"]
    for r in ("first", "hit"):
        eng.add_request(r, prompt, params)
        assert drain(eng)[r] == want
        assert pools_empty(eng)
    assert eng.stats["prefix_cache"]["hit_tokens"] > 0


def test_speculative_decoding_caps_kv_blocks_at_what_max_num_seqs_can_use(model):
    """The KV cap was (1 + k) x max_num_seqs sequences' worth of blocks with MTP: the k scratch
    slots per sequence never hold blocks, so k = 3 allocated 4x the usable KV (3 GiB instead of
    0.75 GiB of the CPU's 4 GiB default for the demo model)."""
    plain = LLMEngine(model, EngineArgs(max_model_len=512, max_num_seqs=4), eos_token_ids=[])
    mtp = LLMEngine(model, EngineArgs(max_model_len=512, max_num_seqs=4,
                                      speculative_config={"num_speculative_tokens": 3}), eos_token_ids=[])
    assert plain.cache.plan.num_blocks == 4 * 512 // 16
    assert mtp.cache.plan.num_blocks == plain.cache.plan.num_blocks


def test_prompt_filling_max_model_len_without_max_tokens_is_named_plainly(model):
    """max_tokens unset and a prompt of max_model_len tokens: the error said
    'max_tokens (None) exceeds max_model_len'; a prompt one shorter gets its one token."""
    eng = LLMEngine(model, EngineArgs(max_model_len=32), eos_token_ids=[])
    with pytest.raises(ValueError, match=r"prompt \(32 tokens\) leaves no room for output tokens within max_model_len \(32\)"):
        eng.add_request("full", [3] * 32, SamplingParams(temperature=0, max_tokens=None))
    eng.add_request("fits", [3] * 31, SamplingParams(temperature=0, max_tokens=None))
    assert len(drain(eng)["fits"]) == 1 and pools_empty(eng)


def _mtp_kv(eng: LLMEngine, seq, positions) -> torch.Tensor:
    kv = eng.cache.cache.kv[eng.model.config.num_hidden_layers]  # the MTP layer's KV
    bs = eng.cache.block_size
    return torch.stack([kv[seq.block_ids[p // bs], :, p % bs] for p in positions])


@pytest.mark.parametrize("parent_stops,cached", [(False, False), (True, False), (True, True)])
def test_mtp_forked_samples_pair_the_last_prompt_position_with_their_own_token(model, parent_stops, cached):
    """n > 1 with MTP: the MTP KV of the last prompt position pairs it with the next token, and
    forked samples kept the parent's (shared, or copied before), so their drafts attended to
    another sample's token; a parent finishing at its first token had run no catch-up at all, and
    its samples drafted over MTP KV never written (`cached`: after a prefix-cache hit, whose
    catch-up of the hit's last position was pending). Each sample's MTP KV now equals that of a
    request made of the prompt and the sample's own first token."""
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, model.config.vocab_size, (32,), generator=g).tolist()  # ends on a block edge
    spec = {"num_speculative_tokens": 2}

    def sampled(stop=()):
        eng = LLMEngine(model, EngineArgs(max_model_len=128, block_size=8, speculative_config=spec,
                                          enable_prefix_caching=cached, prefix_caching_state_block=16), eos_token_ids=[])
        if cached:  # the prompt's first 16 tokens come from the cache
            eng.add_request("warm", prompt[:20], SamplingParams(temperature=0, max_tokens=1))
            drain(eng)
        eng.add_request("n", prompt, SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=6,
                                                    stop_token_ids=list(stop), ignore_eos=True))
        parent, child = eng.requests["n"].seqs
        eng.step()  # the prompt: both samples get their first token, the child forks
        eng.step()  # the child's first decode and its MTP catch-up
        assert not child.mtp_pending and child.num_computed_tokens == len(prompt) + 1
        assert (eng.requests["n"].num_cached_tokens or 0) == (16 if cached else 0)
        return parent, child, eng

    parent, child, _ = sampled()
    first = [parent.token_ids[len(prompt)], child.token_ids[len(prompt)]]
    assert first[0] != first[1]
    parent, child, eng = sampled([first[0]] if parent_stops else [])
    assert (parent.finish_reason == "stop") == parent_stops and child.finish_reason is None
    alone = LLMEngine(model, EngineArgs(max_model_len=128, block_size=8, speculative_config=spec), eos_token_ids=[])
    alone.add_request("a", prompt + [first[1]], SamplingParams(temperature=0, max_tokens=2))
    alone.step()
    ref = alone.requests["a"].seqs[0]
    positions = range(len(prompt))  # (position len(prompt) pairs with a later, different token)
    assert torch.allclose(_mtp_kv(eng, child, positions), _mtp_kv(alone, ref, positions), atol=1e-5)
    drain(eng)
    assert pools_empty(eng)


def _check_pools(eng: LLMEngine) -> None:
    """Every block is free, evictable (prefix cache) or held by exactly its holders; running
    sequences hold distinct slots; waiting ones hold nothing."""
    c, sch = eng.cache, eng.scheduler
    holders = [0] * c.plan.num_blocks
    for seq in sch.running:
        for b in seq.block_ids:
            holders[b] += 1
    assert holders == c._refs
    unused = set(c._free_blocks) | (set(c.prefix.evictable) if c.prefix else set())
    assert len(unused) == c.num_free_blocks and unused == {b for b, n in enumerate(holders) if n == 0}
    slots = [s.slot for s in sch.running]
    assert len(set(slots)) == len(slots) and len(slots) + c.num_free_slots == c.scratch_base
    assert all(not s.block_ids and s.slot == -1 for s in sch.waiting)


def _workload(rng, V: int, max_len: int):
    """Requests sharing prefixes, n up to 3, max_tokens up to filling max_len, stop ids, min_tokens,
    arrivals over time and some aborts."""
    base = [rng.randrange(V) for _ in range(40)]
    reqs = {}
    for i in range(rng.randint(3, 8)):
        p = base[:rng.randint(0, 40)] + [rng.randrange(V) for _ in range(rng.randint(1, 16))]
        mt = rng.choice([1, 3, 12, max_len - len(p)])
        params = SamplingParams(temperature=0, max_tokens=mt, n=rng.choice([1, 1, 2, 3]), ignore_eos=True,
                                min_tokens=min(mt, rng.choice([0, 2])),
                                stop_token_ids=[rng.randrange(V) for _ in range(rng.choice([0, 40]))])
        reqs[f"r{i}"] = (p, params, rng.choice([0, 0, rng.randint(0, 20)]),
                         rng.randint(0, 12) if rng.random() < 0.2 else None)
    return reqs


@pytest.mark.parametrize("seed", range(12))
def test_stress_small_pools_match_one_at_a_time(model, seed):
    """Small KV / slot pools (preemption), chunked prefill at odd budgets, prefix caching, MTP
    drafts, n > 1, aborts at any step: greedy outputs equal each request run alone, the pools stay
    consistent after every step and end empty."""
    import dataclasses
    import random

    rng = random.Random(seed)
    max_len, bs = 96, rng.choice([2, 4, 8])
    k = rng.choice([0, 1, 2, 3])
    seqs = rng.randint(1, 4)
    spec = model.state_spec()
    slot, block = bytes_per_slot(spec, torch.float32), bytes_per_block(spec, bs, torch.float32)
    pc = rng.random() < 0.5
    snaps = 3 if pc else 0
    budget = (seqs * (1 + k) + snaps) * slot + (max_len // bs + rng.randint(0, 4)) * block
    eng = LLMEngine(model, EngineArgs(
        max_model_len=max_len, max_num_seqs=seqs, max_num_batched_tokens=rng.randint(3, 40), block_size=bs,
        kv_cache_memory_bytes=budget, enable_prefix_caching=pc, prefix_caching_state_block=bs * rng.choice([1, 2]),
        prefix_caching_state_fraction=(snaps * slot + 1) / budget,
        speculative_config={"num_speculative_tokens": k} if k else None), eos_token_ids=[])
    reqs = _workload(rng, model.config.vocab_size, max_len)
    got = {r: {} for r in reqs}
    for step in range(3000):
        for r, (p, params, arrive, abort) in reqs.items():
            if step == arrive:
                eng.add_request(r, p, params)
            if abort is not None and step == arrive + abort:
                eng.abort_request(r)
        if step > 40 and not eng.has_unfinished_requests():
            break
        for o in eng.step():
            for c in o.outputs:
                got[o.request_id].setdefault(c.index, []).extend(c.token_ids)
        _check_pools(eng)
    assert pools_empty(eng) and not eng.requests
    alone = LLMEngine(model, EngineArgs(max_model_len=max_len), eos_token_ids=[])
    for r, (p, params, _, abort) in reqs.items():
        alone.add_request(r, p, dataclasses.replace(params, n=1))
        want = drain(alone)[r]
        for i, toks in got[r].items():  # (an aborted request: what it reported so far)
            assert toks == (want[:len(toks)] if abort is not None else want), (r, i)
        assert abort is not None or sorted(got[r]) == list(range(params.n))
