"""Vocabulary-parallel embedding and LM head: rank r holds rows [r*V/N, (r+1)*V/N) of
`embed_tokens.weight` / `lm_head.weight` (same split, so tied embeddings stay one tensor).

The lookup is masked to this rank's ids and all-reduced; the head computes this rank's logit
columns and all-gathers them into [N, V].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .comm import all_gather_last, all_reduce
from .parallel_state import tp_size
from .sharding import even_range, rows


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int):
        start, stop = even_range(vocab_size)
        super().__init__(stop - start, hidden_size)
        self.start, self.stop = start, stop
        self.tp_shards = {"weight": rows(vocab_size)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] (global) -> [T, H]; rows of other ranks' ids are zero before the all-reduce."""
        mine = (ids >= self.start) & (ids < self.stop)
        local = torch.where(mine, ids - self.start, torch.zeros_like(ids))
        x = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(x)


class VocabParallelLMHead(nn.Linear):
    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size // tp_size(), bias=False)
        self.tp_shards = {"weight": rows(vocab_size)}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V] (this rank's columns gathered with the others')."""
        return all_gather_last(super().forward(hidden))
