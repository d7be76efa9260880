"""Long-context index math on the host (session 6, LONGCTX). The Triton kernels' offsets are int64
(reviewed; tests/gpu/test_long_context_gpu.py runs attention with its pages past 2**31 pool
elements on the GPU: Triton's CPU interpreter computes addresses in int64 numpy and cannot show an
int32 wraparound). Here: the packed batch keeps slots, positions and block ids exact past 2**31,
and the YaRN cos / sin at positions up to 1M equal transformers' (no table sized by
max_model_len: rows are computed from the positions each step)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from qwen3next.engine.spec_batch import pack
from qwen3next.forward_batch import ModelCache

BS = 16


def _cache(width: int) -> SimpleNamespace:
    return SimpleNamespace(block_size=BS, block_tables=torch.zeros(2, width, dtype=torch.long), cache=ModelCache())


def test_pack_keeps_long_context_slots_and_block_ids_exact_past_int32():
    # a sequence 1M tokens in whose blocks sit past 2**31 / BS (a pool of that many blocks)
    ctx, n = (1 << 20) - 40, 40
    nb = -(-(ctx + n) // BS)
    base = (1 << 31) // BS + 5
    seq = SimpleNamespace(slot=1, block_ids=[base + 3 * i for i in range(nb)])
    cache = _cache(nb)
    cache.block_tables[1] = torch.tensor(seq.block_ids)
    _, pos, batch = pack(cache, torch.device("cpu"), [(seq, ctx, list(range(n)))])
    want = [seq.block_ids[p // BS] * BS + p % BS for p in range(ctx, ctx + n)]
    assert batch.slot_mapping.dtype == torch.long and batch.slot_mapping.tolist() == want
    assert min(want) > 2**31  # (values an int32 slot mapping could not hold)
    assert pos.tolist() == list(range(ctx, ctx + n)) and batch.context_lens_tensor.tolist() == [ctx]
    assert batch.block_tables.dtype == torch.long and int(batch.block_tables[0, -1]) == seq.block_ids[-1]
    # the decode form (one token) takes the same arithmetic
    _, dpos, dec = pack(cache, torch.device("cpu"), [(seq, ctx + n - 1, [7])])
    assert dec.slot_mapping.tolist() == [want[-1]] and dpos.tolist() == [ctx + n - 1]


def test_yarn_cos_sin_at_1m_positions_equal_transformers():
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import (
        Qwen3NextRotaryEmbedding,
    )

    from qwen3next.config import ModelConfig
    from qwen3next.layers.rotary import RotaryEmbedding

    rope = {"rope_type": "yarn", "rope_theta": 1e7, "partial_rotary_factor": 0.25, "factor": 4.0,
            "original_max_position_embeddings": 262144}  # the model card's 1M recipe
    hf_cfg = Qwen3NextConfig(rope_parameters=rope, head_dim=256, max_position_embeddings=262144, num_hidden_layers=4,
                             num_experts=4, num_experts_per_tok=2, vocab_size=128)
    cfg = ModelConfig.from_hf(hf_cfg.to_dict())
    assert cfg.max_model_len_limit == 1 << 20
    pos = torch.tensor([0, 1, 262143, 262144, 524287, 786433, (1 << 20) - 1])
    cos, sin = RotaryEmbedding(cfg.rope)(pos, torch.float32)                  # [7, 64]
    hf_cos, hf_sin = Qwen3NextRotaryEmbedding(hf_cfg)(torch.zeros(1, len(pos), 8), pos[None])
    assert cos.shape == (len(pos), 64)
    # fp32 angles as transformers (and vLLM's cache) compute them: the same numbers, bit for bit
    assert torch.equal(cos, hf_cos[0]) and torch.equal(sin, hf_sin[0])
    # the attention factor is applied: cos(0) = m = 0.1 ln 4 + 1
    torch.testing.assert_close(cos[0], torch.full((64,), 1.138629436), rtol=0, atol=1e-6)
