"""Gated full-attention mixer (architecture.md §6): q_proj yields per-head [query | gate], per-head
zero-centred q/k norm, partial RoPE, GQA, sigmoid output gate before o_proj.

Without a cache it runs varlen causal attention; with one it writes K (after norm + RoPE) and V at
`batch.slot_mapping` into `cache.kv[cache_index]` and attends over the paged cache.
With tensor parallelism each rank holds a subset of the heads (sharding.py) and o_proj's partial
sums are all-reduced.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..distributed.comm import all_reduce
from ..distributed.parallel_state import tp_size
from ..distributed.sharding import Shard, cols, kv_head_range, rows
from ..forward_batch import ForwardBatch
from ..kernels import ops
from .norm import ZCRMSNorm


class GatedAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, cache_index: int):
        super().__init__()
        self.cache_index = cache_index
        self.tp = tp_size()
        # this rank's query heads and kv heads (kv heads replicated when fewer than ranks)
        self.num_heads = cfg.num_attention_heads // self.tp
        self.num_kv_heads = max(cfg.num_key_value_heads // self.tp, 1)
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        H, D = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(H, self.num_heads * D * 2, bias=False)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=False)
        self.q_norm = ZCRMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = ZCRMSNorm(D, cfg.rms_norm_eps)
        if self.tp > 1:
            kv = Shard(0, (tuple(h * D for h in kv_head_range(cfg.num_key_value_heads)),))
            self.q_proj.tp_shards = {"weight": rows(cfg.num_attention_heads, 2 * D)}  # per head [query | gate]
            self.k_proj.tp_shards = self.v_proj.tp_shards = {"weight": kv}
            self.o_proj.tp_shards = {"weight": cols(cfg.num_attention_heads, D)}

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T, D = x.shape[0], self.head_dim
        qg = self.q_proj(x).view(T, self.num_heads, 2 * D)
        q, gate = qg[..., :D], qg[..., D:]  # per head: [query | gate]
        k = self.k_proj(x).view(T, self.num_kv_heads, D)
        v = self.v_proj(x).view(T, self.num_kv_heads, D)
        q = ops.apply_rotary(self.q_norm(q), cos, sin)
        k = ops.apply_rotary(self.k_norm(k), cos, sin)
        if batch.cache is None:
            o = ops.causal_attention(q, k, v, batch.cu_seqlens, self.scale)
        else:
            kv = batch.cache.kv[self.cache_index]
            ops.write_kv(k, v, kv, batch.slot_mapping)
            o = ops.paged_attention(q, kv, batch.block_tables, batch.cu_seqlens, batch.context_lens_tensor, self.scale)
        o = ops.gate_output(o, gate)
        o = self.o_proj(o.reshape(T, self.num_heads * D))
        if self.tp > 1:  # row-parallel o_proj: sum the ranks' partial outputs
            o = all_reduce(o)
        return o
