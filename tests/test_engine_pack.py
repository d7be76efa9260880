"""spec_batch.pack: the one batch builder, against a per-token definition of its fields."""

from __future__ import annotations

import torch

from qwen3next.engine.cache import CacheManager, plan_cache
from qwen3next.engine.sequence import Request, Sequence
from qwen3next.engine.spec_batch import pack
from qwen3next.forward_batch import StateSpec
from qwen3next.sampling_params import SamplingParams


def test_pack_matches_per_token_definition():
    spec = StateSpec(kv_layers={0: (1, 4)}, conv_layers={1: (4, 3)}, recurrent_layers={1: (1, 2, 2)})
    bs = 4
    plan = plan_cache(spec, torch.float32, bs, 8, 1 << 20, max_blocks=40)
    cm = CacheManager(spec, plan, torch.float32, torch.device("cpu"), 64, num_scratch_slots=2)
    seqs = []
    for i, n in enumerate([13, 1, 9]):
        s = Sequence(i, Request(str(i), list(range(1, n + 1)), SamplingParams(), frozenset(), 64), 0,
                     torch.device("cpu"))
        cm.allocate_slot(s)
        cm.grow(s, n + 3)
        seqs.append(s)
    # blocks handed out interleaved so that tables are not the identity
    cm.grow(seqs[1], 12)
    # a prefill crossing blocks mid-way, a decode, a short run starting inside a block
    runs = [(seqs[0], 2, [5, 6, 7, 8, 9, 10, 11]), (seqs[1], 6, [3]), (seqs[2], 7, [4, 4, 4])]
    pts = [-1] * 7 + [7] + [6, 5, -1]
    ids, pos, batch = pack(cm, torch.device("cpu"), runs, pts)
    exp_pos = [p for s, c, t in runs for p in range(c, c + len(t))]
    exp_map = [s.block_ids[p // bs] * bs + p % bs for s, c, t in runs for p in range(c, c + len(t))]
    assert ids.tolist() == [x for _, _, t in runs for x in t]
    assert pos.tolist() == exp_pos
    assert batch.slot_mapping.tolist() == exp_map
    assert batch.cu_seqlens.tolist() == [0, 7, 8, 11]
    assert batch.seq_lens == [7, 1, 3] and batch.context_lens == [2, 6, 7]
    assert batch.context_lens_tensor.tolist() == [2, 6, 7]
    assert batch.has_initial_state.tolist() == [True, True, True]
    assert batch.state_slots.tolist() == [s.slot for s in seqs]
    assert batch.per_token_state_slots.tolist() == pts
    width = max(len(s.block_ids) for s in seqs)
    assert batch.block_tables.shape == (3, width)
    for r, s in enumerate(seqs):
        assert batch.block_tables[r, :len(s.block_ids)].tolist() == s.block_ids
