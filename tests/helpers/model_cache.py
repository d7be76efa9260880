"""A hand-built ModelCache and ForwardBatch for model-level tests (no engine needed).

`TinyCache(model, ...)` allocates paged KV blocks and DeltaNet state slots from the model's
StateSpec; each sequence gets a state slot and a (deliberately non-contiguous) list of blocks.
`step(...)` runs one forward for several sequences, each bringing some new tokens.
"""

from __future__ import annotations

import torch

from qwen3next.forward_batch import ForwardBatch, ModelCache


class TinyCache:
    def __init__(self, model, num_seqs: int = 4, max_len: int = 256, block_size: int = 4,
                 dtype: torch.dtype = torch.float32):
        spec = model.state_spec()
        self.block_size = block_size
        self.blocks_per_seq = -(-max_len // block_size)
        nb = num_seqs * self.blocks_per_seq
        self.cache = ModelCache(
            kv={i: torch.zeros(nb, 2, block_size, h, d, dtype=dtype) for i, (h, d) in spec.kv_layers.items()},
            conv={i: torch.zeros(num_seqs + 1, *s, dtype=dtype) for i, s in spec.conv_layers.items()},
            recurrent={i: torch.zeros(num_seqs + 1, *s, dtype=torch.float32) for i, s in spec.recurrent_layers.items()},
            block_size=block_size,
        )
        # sequence s owns blocks s, s + num_seqs, s + 2*num_seqs, ... (interleaved on purpose)
        self.tables = torch.stack([torch.arange(s, nb, num_seqs) for s in range(num_seqs)])
        self.lens = [0] * num_seqs  # tokens cached per sequence

    def batch(self, seq_ids: list[int], new_lens: list[int]) -> ForwardBatch:
        """The ForwardBatch for sequences `seq_ids` bringing `new_lens` tokens (and advance them)."""
        bs = self.block_size
        slots = []
        for s, n in zip(seq_ids, new_lens):
            for p in range(self.lens[s], self.lens[s] + n):
                slots.append(int(self.tables[s, p // bs]) * bs + p % bs)
        cu = torch.zeros(len(seq_ids) + 1, dtype=torch.long)
        cu[1:] = torch.tensor(new_lens).cumsum(0)
        fb = ForwardBatch(
            cu_seqlens=cu, seq_lens=list(new_lens), context_lens=[self.lens[s] for s in seq_ids],
            cache=self.cache, block_tables=self.tables[seq_ids], slot_mapping=torch.tensor(slots, dtype=torch.long),
            state_slots=torch.tensor(seq_ids, dtype=torch.long) + 1,  # slot 0 stays unused
        )
        for s, n in zip(seq_ids, new_lens):
            self.lens[s] += n
        return fb

    def positions(self, seq_ids: list[int], new_lens: list[int]) -> torch.Tensor:
        """Positions of the next new tokens (call before `batch`, which advances the lengths)."""
        return torch.cat([torch.arange(self.lens[s], self.lens[s] + n) for s, n in zip(seq_ids, new_lens)])
