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
from .fused import DerivedWeight
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
        self._qkv = DerivedWeight(lambda q, k, v: torch.cat([q, k, v]))  # CPU inference (fused.py)
        hq, hkv = self.num_heads, self.num_kv_heads
        self._qk_norm = DerivedWeight(lambda wq, wk: torch.cat([wq.expand(hq, -1), wk.expand(hkv, -1)]))
        if self.tp > 1:
            kv = Shard(0, (tuple(h * D for h in kv_head_range(cfg.num_key_value_heads)),))
            self.q_proj.tp_shards = {"weight": rows(cfg.num_attention_heads, 2 * D)}  # per head [query | gate]
            self.k_proj.tp_shards = self.v_proj.tp_shards = {"weight": kv}
            self.o_proj.tp_shards = {"weight": cols(cfg.num_attention_heads, D)}

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T, D = x.shape[0], self.head_dim
        if batch.cache is not None and ops.cpu_fast_ok(x, self.q_proj.weight):
            q, gate, k, v = self._qkv_cpu(x, cos, sin)
        else:
            qg = self.q_proj(x).view(T, self.num_heads, 2 * D)
            q, gate = qg[..., :D], qg[..., D:]  # per head: [query | gate]
            k = self.k_proj(x).view(T, self.num_kv_heads, D)
            v = self.v_proj(x).view(T, self.num_kv_heads, D)
            q = ops.norm_rotary(q, self.q_norm.weight, self.q_norm.eps, cos, sin)
            k = ops.norm_rotary(k, self.k_norm.weight, self.k_norm.eps, cos, sin)
        if batch.cache is None:
            o = ops.causal_attention(q, k, v, batch.cu_seqlens, self.scale)
        else:
            kv = batch.cache.kv[self.cache_index]
            ops.write_kv(k, v, kv, batch.slot_mapping)
            # no cached tokens anywhere: the prefill may attend over k / v directly (kernels/triton/attention.py)
            fresh = None if any(batch.context_lens) else batch.seq_lens
            o = ops.paged_attention(q, kv, batch.block_tables, batch.cu_seqlens, batch.context_lens_tensor, self.scale,
                                    k=k, v=v, fresh_lens=fresh)
        o = ops.gate_output(o, gate).reshape(T, self.num_heads * D)
        if self.tp == 1 and ops.cpu_fast_ok(o, self.o_proj.weight):
            return ops.linear(o, self.o_proj.weight)
        o = self.o_proj(o)
        if self.tp > 1:  # row-parallel o_proj: sum the ranks' partial outputs
            o = all_reduce(o)
        return o

    def _qkv_cpu(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """CPU inference: q/k/v projections as one matmul over stacked weights, and the q and k heads
        normed and rotated together (a per-head norm weight) -> q, gate [T, Hq, D], k, v [T, Hkv, D]."""
        T, D, Hq, Hkv = x.shape[0], self.head_dim, self.num_heads, self.num_kv_heads
        y = ops.linear(x, self._qkv.get(self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        qg = y[:, : Hq * 2 * D].view(T, Hq, 2 * D)
        k = y[:, Hq * 2 * D : (Hq * 2 + Hkv) * D].view(T, Hkv, D)
        v = y[:, (Hq * 2 + Hkv) * D :].view(T, Hkv, D)
        w = self._qk_norm.get(self.q_norm.weight, self.k_norm.weight)  # [Hq + Hkv, D]
        qk = ops.apply_rotary(ops.zc_rmsnorm(torch.cat([qg[..., :D], k], dim=1), w, self.q_norm.eps), cos, sin)
        return qk[:, :Hq], qg[..., D:], qk[:, Hq:], v
