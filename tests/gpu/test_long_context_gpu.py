"""Long context on the GPU (pytest -m gpu; benchmarks/gpu_long_context.py measures the full 256K
case): one attention layer at 64K whose KV pages sit past 2**31 elements of the pool (the kernels'
int64 offsets) against torch SDPA and fp32, and a 64K prompt through the engine in chunks of 8192
(paged prefix attention, DeltaNet states carried across chunks) against the same prompt in one
chunk (no prefix: the fresh attention path, states from zero) on 80B-dims layers."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

L = 65536


def test_attention_at_64k_with_pages_past_int32_matches_sdpa_and_fp32():
    from benchmarks.gpu_long_context import attention_check

    r = attention_check(L, 2048, high_pool=True)
    assert r["first_page_element"] >= 2**31 and r["finite"], r
    # bf16 rounding (q / k / v, P before P V, the output) is ~2e-3; a wrong page or offset is ~1
    assert r["ours_vs_fp32"] < 1e-2 and r["decode_ours_vs_fp32"] < 1e-2, r
    assert r["prefill_ours_vs_sdpa"] < 2e-2 and r["decode_ours_vs_sdpa"] < 2e-2, r


@torch.inference_mode()
def test_64k_prompt_in_chunks_matches_one_chunk():
    import benchmarks.gpu_long_context as glc
    from qwen3next.engine import EngineArgs, LLMEngine

    # 80B dims on 4 layers (3 DeltaNet + 1 attention), a smaller vocabulary
    model = glc.build_slice(dict(glc.ROPE), num_hidden_layers=4, layer_types=glc.DIMS["layer_types"][:4],
                            vocab_size=32768, max_position_embeddings=L)
    tap = glc.LogitTap(model)
    prompt = glc.prompt_of(L - 8, 7, vocab=32768)
    runs = []
    for chunk in (8192, L):
        eng = LLMEngine(model, EngineArgs(device="cuda", max_num_seqs=1, max_num_batched_tokens=chunk, max_model_len=L,
                                          enforce_eager=True, kv_cache_memory_bytes=1 << 30), eos_token_ids=[])
        runs.append(glc.run_request(eng, prompt, 4, chunk, tap))
        del eng
    a, b = runs[0]["_logits"], runs[1]["_logits"]
    err, diff = glc.rel_err(a, b), float((a - b).abs().max())
    top2 = b.topk(2).values
    margin = float(top2[0] - top2[1])
    print(f"64K chunks 8192 vs one: rel err {err:.3e}, max |diff| {diff:.3e}, margin {margin:.3e}, "
          f"tokens {runs[0]['tokens']} / {runs[1]['tokens']}")
    assert a.isfinite().all() and err < 0.1, (err, diff)
    # the greedy pick may differ only where the two logit rows cannot tell the top two apart
    assert a.argmax() == b.argmax() or margin < 2 * diff, (margin, diff)
    assert runs[0]["tokens"][0] == runs[1]["tokens"][0] or margin < 2 * diff
