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
