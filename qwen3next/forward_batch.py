"""What one model forward sees: a flat, packed batch of sequences and the caches it may use.

The engine builds a `ForwardBatch` per step; the model never allocates or owns cache memory.
A forward with `cache=None` is a cache-less full forward (training, parity tests): every sequence
starts at position 0 and no state is read or written.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


@dataclass
class StateSpec:
    """Shapes the model declares so the engine can allocate its caches (per layer, per unit)."""

    # full-attention layer index -> (num_kv_heads, head_dim); MTP layers use index
    # num_hidden_layers + i so the MTP layer's own KV cache is planned like any other.
    kv_layers: dict[int, tuple[int, int]]
    # linear-attention layer index -> conv state shape per slot [conv_dim, K-1]
    conv_layers: dict[int, tuple[int, int]]
    # linear-attention layer index -> recurrent state shape per slot [H_v, d_k, d_v] (the pool's dtype)
    recurrent_layers: dict[int, tuple[int, int, int]]


@dataclass
class ModelCache:
    """Cache tensors allocated by the engine from the model's `StateSpec`.

    kv[i]:        [num_blocks, 2, block_size, num_kv_heads, head_dim]  (K after k_norm+RoPE, V)
    conv[i]:      [num_slots, conv_dim, K-1]       activation dtype, the last K-1 pre-conv inputs
    recurrent[i]: [num_slots, H_v, d_k, d_v]       the delta-rule state S: fp32 (default), bf16 or fp16
                                                   (mamba_ssm_cache_dtype; kernels compute in fp32)
    """

    kv: dict[int, torch.Tensor] = field(default_factory=dict)
    conv: dict[int, torch.Tensor] = field(default_factory=dict)
    recurrent: dict[int, torch.Tensor] = field(default_factory=dict)
    block_size: int = 16


@dataclass
class ForwardBatch:
    """A packed batch of B sequences holding T new tokens in all.

    input ids / positions travel separately as [T] tensors; this carries the per-sequence layout.
    """

    cu_seqlens: torch.Tensor  # [B+1] int64, offsets of each sequence's new tokens in the flat batch
    seq_lens: list[int]  # host copy: new tokens per sequence
    context_lens: list[int]  # host copy: tokens already cached before this step (0 = fresh)
    cache: ModelCache | None = None
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int64 (cache only)
    slot_mapping: torch.Tensor | None = None  # [T] int64: block * block_size + offset for each new token
    state_slots: torch.Tensor | None = None  # [B] int64: DeltaNet state slot of each sequence
    # Speculative verify: when set, DeltaNet layers also write the state after every token of each
    # sequence to these per-position slots ([T] int64, -1 = don't save), so a rejected draft can
    # be rolled back to the state after the last accepted token.
    per_token_state_slots: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def is_decode(self) -> bool:
        """Every sequence brings exactly one token on top of a cached prefix."""
        return all(n == 1 for n in self.seq_lens) and all(c > 0 for c in self.context_lens)

    # Per-step tensors every layer needs, built on first use and shared by all layers of the step.
    @functools.cached_property
    def context_lens_tensor(self) -> torch.Tensor:
        """[B] int64 on the batch's device: `context_lens` as a tensor."""
        return torch.tensor(self.context_lens, dtype=torch.long, device=self.cu_seqlens.device)

    @functools.cached_property
    def has_initial_state(self) -> torch.Tensor:
        """[B] bool: the sequence continues from cached state (context_len > 0)."""
        return self.context_lens_tensor > 0

    @classmethod
    def full(cls, seq_lens: list[int], device: torch.device | str = "cpu") -> "ForwardBatch":
        """A cache-less batch of fresh sequences (training, reference forwards)."""
        cu = torch.zeros(len(seq_lens) + 1, dtype=torch.long)
        cu[1:] = torch.tensor(seq_lens, dtype=torch.long).cumsum(0)
        return cls(cu_seqlens=cu.to(device), seq_lens=list(seq_lens), context_lens=[0] * len(seq_lens))
