"""Prompt logprobs (SamplingParams.prompt_logprobs) against a cache-less full forward of the same
model: chunked prefill, batches mixing requests that ask and that don't, n > 1, preemption and
recompute, MTP speculative decoding, the engine-process wire format, and bad values."""

from __future__ import annotations

import pytest
import torch

from qwen3next import LLM, SamplingParams
from qwen3next.forward_batch import ForwardBatch

LONG = [(7 * i + 3) % 500 for i in range(45)]  # three chunks of 16
SHORT = [11, 12, 13, 400, 5]


def reference(model, ids: list[int]) -> torch.Tensor:
    """[L, V] log-softmax of a cache-less forward (row p predicts token p + 1)."""
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), ForwardBatch.full([len(ids)]))
        return torch.log_softmax(model.compute_logits(hidden), -1)


def check(entries, ids: list[int], ref: torch.Tensor, top: int) -> None:
    assert len(entries) == len(ids) and entries[0] is None
    eps = 1e-4  # near-ties may order either way between the two forwards
    for p in range(1, len(ids)):
        d, row, t = entries[p], ref[p - 1], ids[p]
        assert d[t].logprob == pytest.approx(row[t].item(), abs=eps)
        assert int((row > row[t] + eps).sum()) + 1 <= d[t].rank <= int((row > row[t] - eps).sum()) + 1
        assert len(d) in (top, top + 1) and (t in row.topk(top).indices or len(d) == top + 1), p
        kth = row.topk(top).values[-1].item() if top else None
        for k in set(d) - {t}:
            assert d[k].logprob == pytest.approx(row[k].item(), abs=eps) and row[k] >= kth - eps


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    # 16-token steps: LONG is prefilled over three steps, sharing them with the other prompts
    return LLM(model=tiny_ckpt, dtype="float32", device="cpu", max_model_len=256, max_num_seqs=4,
               max_num_batched_tokens=16)


def test_chunked_mixed_batch_matches_full_forward(llm):
    model = llm.llm_engine.model
    greedy = dict(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = [{"prompt_token_ids": LONG}, {"prompt_token_ids": SHORT}, {"prompt_token_ids": SHORT[:3]},
               {"prompt_token_ids": [42]}]
    params = [SamplingParams(prompt_logprobs=3, **greedy), SamplingParams(**greedy),
              SamplingParams(prompt_logprobs=0, n=2, seed=5, temperature=1.0, max_tokens=3),
              SamplingParams(prompt_logprobs=2, **greedy)]
    outs = llm.generate(prompts, params)
    check(outs[0].prompt_logprobs, LONG, reference(model, LONG), 3)
    assert outs[1].prompt_logprobs is None
    check(outs[2].prompt_logprobs, SHORT[:3], reference(model, SHORT[:3]), 0)
    assert outs[3].prompt_logprobs == [None]  # one token: nothing to score
    assert outs[0].prompt_logprobs[1][LONG[1]].decoded_token == llm.get_tokenizer().decode([LONG[1]])
    # asking changes nothing about what is generated
    alone = llm.generate([{"prompt_token_ids": LONG}, {"prompt_token_ids": SHORT}], SamplingParams(**greedy))
    assert [o.outputs[0].token_ids for o in alone] == [o.outputs[0].token_ids for o in outs[:2]]
    assert not llm.llm_engine._prompt_lps  # nothing left behind


def test_preemption_reports_each_prompt_once(llm):
    from qwen3next.engine import EngineArgs, LLMEngine
    from qwen3next.engine.cache import bytes_per_block, bytes_per_slot

    model = llm.llm_engine.model
    spec, bs = model.state_spec(), 8
    # 4 slots but blocks for ~150 tokens: sequences mid-prompt or mid-decode get preempted
    budget = 4 * bytes_per_slot(spec, torch.float32) + 19 * bytes_per_block(spec, bs, torch.float32)
    eng = LLMEngine(model, EngineArgs(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=24,
                                      block_size=bs, kv_cache_memory_bytes=budget), eos_token_ids=[])
    prompts = [[(p * 13 + 31 * i) % 500 for i in range(n)] for p, n in enumerate([60, 50, 45, 30])]
    for i, ids in enumerate(prompts):
        eng.add_request(str(i), ids, SamplingParams(prompt_logprobs=1, temperature=0, max_tokens=40))
    got: dict[str, list] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.prompt_logprobs is not None:
                assert out.request_id not in got  # reported once, with the first output
                got[out.request_id] = out.prompt_logprobs
    assert eng.scheduler.num_preemptions > 0
    for i, ids in enumerate(prompts):
        check(got[str(i)], ids, reference(model, ids), 1)


def test_speculative_decoding_keeps_prompt_logprobs(tiny_ckpt):
    spec = LLM(model=tiny_ckpt, dtype="float32", device="cpu", max_model_len=256, max_num_seqs=4,
               max_num_batched_tokens=16, speculative_config={"method": "qwen3_next_mtp", "num_speculative_tokens": 2})
    outs = spec.generate([{"prompt_token_ids": LONG}, {"prompt_token_ids": SHORT}],
                         [SamplingParams(prompt_logprobs=2, temperature=0, max_tokens=6, ignore_eos=True),
                          SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)])
    check(outs[0].prompt_logprobs, LONG, reference(spec.llm_engine.model, LONG), 2)
    assert outs[1].prompt_logprobs is None


def test_engine_process_wire_carries_them():
    from qwen3next.api.engine_process import decode_output, encode_outputs
    from qwen3next.outputs import CompletionOutput, Logprob, RequestOutput

    out = RequestOutput("r", None, [1, 2], [CompletionOutput(0, "", [3], None, None)], False,
                        prompt_logprobs=[None, {2: Logprob(-1.5, 4), 9: Logprob(-0.5, 1)}])
    back = decode_output(encode_outputs([out])[0])
    assert back.prompt_logprobs == [None, {2: Logprob(-1.5, 4), 9: Logprob(-0.5, 1)}]
    out.prompt_logprobs = None
    assert decode_output(encode_outputs([out])[0]).prompt_logprobs is None


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_values_are_one_line_errors(bad):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=bad)
