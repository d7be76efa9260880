"""Gated DeltaNet linear-attention mixer (architecture.md §5).

`in_proj_qkvz` / `in_proj_ba` keep the checkpoint's per-key-head grouped row layout (§5.1): the
split below reads it through a [T, Hk, ...] view, so no load-time permutation is needed and a
tensor-parallel rank owns whole key-head groups (their rows, conv channels, A_log / dt_bias).
Conv channels are [q_all|k_all|v_all].
State per sequence: conv `[conv_dim, K-1]` (pre-conv inputs) and recurrent `[Hv, dk, dv]` (fp32 by
default; a bf16 / fp16 pool with mamba_ssm_cache_dtype, computed in fp32),
read/written at `batch.state_slots` in `cache.conv[i]` / `cache.recurrent[i]`.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from ..config import ModelConfig
from ..distributed.comm import all_reduce
from ..distributed.parallel_state import tp_size
from ..distributed.sharding import Shard, cols, even_range, rows
from ..env_switches import switch
from ..forward_batch import ForwardBatch
from ..kernels import ops
from .fused import DerivedWeight
from .norm import GatedRMSNorm

# Cached batches up to this many tokens hand the conv kernels the grouped projection + column map
# (read in place: heads of 128 columns); longer ones copy q / k / v into one [T, conv_dim] buffer
# (three strided copies). Any length since session 5: the 8K prefill's copies were 1.07 ms of 6 layers
# on the H200 and the varlen conv reads the map as fast as a contiguous input (174 vs 169 us), the
# 8-layer slice's graph replay 29.41 -> 28.70 ms. Not with QWEN3NEXT_GDN_FUSED=0 (kernels/triton/
# gdn_prep.py's kill switch: that path copies).
GROUPED_MAX_T = 0 if switch("QWEN3NEXT_GDN_FUSED") == "0" else sys.maxsize


def _regroup_rows(Hk: int, dk: int, rdv: int, r: int, w_qkvz: torch.Tensor, w_ba: torch.Tensor) -> torch.Tensor:
    """Per-key-head grouped rows of in_proj_qkvz / in_proj_ba -> [q_all | k_all | v_all | z | b | a]."""
    H = w_qkvz.shape[-1]
    q, k, v, z = torch.split(w_qkvz.view(Hk, 2 * dk + 2 * rdv, H), [dk, dk, rdv, rdv], dim=1)
    ba = w_ba.view(Hk, 2 * r, H)
    return torch.cat([t.reshape(-1, H) for t in (q, k, v, z, ba[:, :r], ba[:, r:])])


def _regroup_ba(Hk: int, r: int, w_ba: torch.Tensor) -> torch.Tensor:
    """Per-key-head grouped rows of in_proj_ba -> [b_all | a_all]."""
    ba = w_ba.view(Hk, 2 * r, w_ba.shape[-1])
    return torch.cat([ba[:, :r].reshape(Hk * r, -1), ba[:, r:].reshape(Hk * r, -1)])


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.tp = tp_size()
        # this rank's key-head groups: each key head with its r value heads (§5.1)
        self.num_k_heads = cfg.linear_num_key_heads // self.tp
        self.num_v_heads = cfg.linear_num_value_heads // self.tp
        self.head_k_dim, self.head_v_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.ratio = self.num_v_heads // self.num_k_heads
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel_size = cfg.linear_conv_kernel_dim
        H = cfg.hidden_size
        self.in_proj_qkvz = nn.Linear(H, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(H, 2 * self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel_size, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.num_v_heads).uniform_(1, 16)))
        self.norm = GatedRMSNorm(self.head_v_dim, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, H, bias=False)
        self._proj = DerivedWeight(functools.partial(_regroup_rows, self.num_k_heads, self.head_k_dim,
                                                     self.ratio * self.head_v_dim, self.ratio))
        self._cols: dict[str, torch.Tensor] = {}  # per device: conv channel -> grouped projection column
        self._ba = DerivedWeight(functools.partial(_regroup_ba, self.num_k_heads, self.ratio))
        if self.tp > 1:
            self._declare_shards(cfg)

    def _declare_shards(self, cfg: ModelConfig) -> None:
        """Whole key-head groups per rank: contiguous rows of the grouped projections; the conv
        channels of those heads in each of the q_all | k_all | v_all blocks; out_proj columns."""
        dk, dv, hk, hv = self.head_k_dim, self.head_v_dim, cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.in_proj_qkvz.tp_shards = {"weight": rows(hk, 2 * dk + 2 * self.ratio * dv)}
        self.in_proj_ba.tp_shards = {"weight": rows(hk, 2 * self.ratio)}
        (qa, qb), (va, vb), kd = even_range(hk, dk), even_range(hv, dv), hk * dk
        self.conv1d.tp_shards = {"weight": Shard(0, ((qa, qb), (kd + qa, kd + qb), (2 * kd + va, 2 * kd + vb)))}
        self.tp_shards = {"A_log": rows(hv), "dt_bias": rows(hv)}
        self.out_proj.tp_shards = {"weight": cols(hv, dv)}

    def _split(self, x: torch.Tensor, grouped: bool = False):
        """-> m, z (rows of dv: [T, Hv, dv] or [T * Hk, r, dv]), b, a [T, Hv], m_cols from the grouped
        projections. m is the conv input [T, conv_dim]; `grouped`: m is in_proj_qkvz's whole output
        [T, Hk * (2dk + 2r dv)] and conv channel c is its column m_cols[c] (the GPU kernels read it
        in place, nothing is copied)."""
        T, Hk, dk, dv, r = x.shape[0], self.num_k_heads, self.head_k_dim, self.head_v_dim, self.ratio
        kd, Hv = self.key_dim, self.num_v_heads
        if ops.cpu_fast_ok(x, self.in_proj_qkvz.weight):
            # CPU inference: one matmul over both projections' rows regrouped as [q|k|v|z|b|a] (views out)
            y = ops.linear(x, self._proj.get(self.in_proj_qkvz.weight, self.in_proj_ba.weight))
            C, Vd = self.conv_dim, self.value_dim
            return y[:, :C], y[:, C : C + Vd].view(T, Hv, dv), y[:, C + Vd : C + Vd + Hv], y[:, C + Vd + Hv :], None
        p = self.in_proj_qkvz(x).view(T, Hk, 2 * dk + 2 * r * dv)
        q, k, v, z = torch.split(p, [dk, dk, r * dv, r * dv], dim=-1)
        if grouped:
            m, cols = p.view(T, -1), self._conv_cols(p.device)
        else:  # m = [q_all | k_all | v_all]: each part one strided copy into its columns
            m, cols = p.new_empty(T, self.conv_dim), None
            m[:, :kd].view(T, Hk, dk).copy_(q)
            m[:, kd:2 * kd].view(T, Hk, dk).copy_(k)
            m[:, 2 * kd:].view(T, Hk, r * dv).copy_(v)
        w_ba = self.in_proj_ba.weight
        if (torch.is_grad_enabled() and w_ba.requires_grad) or w_ba.dtype != x.dtype:  # training, fp8 layers
            pb = self.in_proj_ba(x).view(T, Hk, 2 * r)
            b, a = pb[..., :r].reshape(T, -1), pb[..., r:].reshape(T, -1)
        else:  # inference: in_proj_ba's rows regrouped once as [b_all | a_all], b and a are views
            ba = nn.functional.linear(x, self._ba.get(w_ba))
            b, a = ba[:, :Hv], ba[:, Hv:]
        # z as [T * Hk, r, dv] rows (= [T, Hv, dv] order): a view, the gated norm reads it in place
        return m, z.view(T * Hk, r, dv), b, a, cols

    def _conv_cols(self, device: torch.device) -> torch.Tensor:
        """[conv_dim] long: the column of in_proj_qkvz's grouped output [T, Hk * W] holding each conv
        channel of [q_all | k_all | v_all] (head hk's row block is [q dk | k dk | v r dv | z r dv])."""
        key = str(device)
        if key not in self._cols:
            Hk, dk, rdv = self.num_k_heads, self.head_k_dim, self.ratio * self.head_v_dim
            base = torch.arange(Hk)[:, None] * (2 * dk + 2 * rdv)
            q, k = base + torch.arange(dk), base + dk + torch.arange(dk)
            v = base + 2 * dk + torch.arange(rdv)
            self._cols[key] = torch.cat([q.flatten(), k.flatten(), v.flatten()]).to(device)
        return self._cols[key]

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T = x.shape[0]
        cache = batch.cache
        # cached inference: the GPU conv kernels read q / k / v from the projection in place (other
        # paths gather them once in ops; the CPU fast path has its own regrouped projection)
        grouped = cache is not None and not torch.is_grad_enabled() and T <= GROUPED_MAX_T
        m, z, b, a, cols = self._split(x, grouped)
        w = self.conv1d.weight[:, 0, :]  # [C, K]
        if cache is not None and batch.is_decode and batch.per_token_state_slots is None:
            # one token per sequence: conv update, norms, gates and recurrence as one fused step
            o = ops.gdn_decode(m, a, b, w, cache.conv[self.layer_idx], cache.recurrent[self.layer_idx],
                               batch.state_slots, self.A_log, self.dt_bias, self.num_k_heads, m_cols=cols)
            o = self.norm(o.reshape(z.shape), z)  # rows of dv
            return self._out(o.reshape(T, self.value_dim))
        if cache is None:
            mc = ops.causal_conv1d_varlen(m, w, batch.cu_seqlens)
            q, k, v, g, beta = ops.qkv_gates(mc, a, b, self.A_log, self.dt_bias, self.num_k_heads, self.head_k_dim,
                                             self.num_v_heads, self.head_v_dim)
            o = ops.gated_delta_rule_chunked(q, k, v, g, beta, batch.cu_seqlens)
            o = self.norm(o.reshape(z.shape), z)  # rows of dv
        else:  # prefill chunks, mixed steps, speculative verify (per-token states), the gated norm
            # included (on CUDA in the delta rule's output kernel: o is never stored unnormalised)
            o = ops.gdn_cached(m, a, b, w, cache.conv[self.layer_idx], cache.recurrent[self.layer_idx],
                               batch.cu_seqlens, batch.state_slots, batch.has_initial_state,
                               batch.per_token_state_slots, self.A_log, self.dt_bias, self.num_k_heads, m_cols=cols,
                               norm=(z, self.norm.weight, self.norm.eps))
        return self._out(o.reshape(T, self.value_dim))

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        """[T, value_dim] -> [T, H]; row-parallel under tensor parallelism (ranks' sums added)."""
        if self.tp == 1 and ops.cpu_fast_ok(o, self.out_proj.weight):
            return ops.linear(o, self.out_proj.weight)
        o = self.out_proj(o)
        return all_reduce(o) if self.tp > 1 else o
