"""Attention references (architecture.md §6.2): KV-cache write, attention over the paged KV cache
(prefill with a cached prefix, and decode), and cache-less varlen causal attention.

Paged layout: kv_cache [num_blocks, 2, block_size, Hkv, D]; a token's slot is
block * block_size + offset. GQA: query head h reads KV head h // (Hq // Hkv). Softmax in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _as_list(x) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] -> kv_cache at slot_mapping [T] (negative slots are skipped)."""
    bs = kv_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blk, off = slots // bs, slots % bs
    kv_cache[blk, 0, off] = k[keep].to(kv_cache.dtype)
    kv_cache[blk, 1, off] = v[keep].to(kv_cache.dtype)


def _attend(q, k, v, scale, q_offset):
    """q [n, Hq, D], k/v [L, Hkv, D]; query i sits at absolute position q_offset + i."""
    n, Hq, _ = q.shape
    L, Hkv, _ = k.shape
    rep = Hq // Hkv
    kk = k.repeat_interleave(rep, dim=1).transpose(0, 1).float()  # [Hq, L, D]
    vv = v.repeat_interleave(rep, dim=1).transpose(0, 1).float()
    s = torch.einsum("nhd,hld->hnl", q.float(), kk) * scale  # [Hq, n, L]
    qpos = torch.arange(n, device=q.device)[:, None] + q_offset
    mask = torch.arange(L, device=q.device)[None, :] > qpos  # future keys
    p = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1)
    return torch.einsum("hnl,hld->nhd", p, vv).to(q.dtype)


def paged_attention(q, kv_cache, block_tables, cu_seqlens, context_lens, scale) -> torch.Tensor:
    """q [T, Hq, D]; new tokens are already written; context_lens [B] = cached tokens before
    this step. Causal over cached prefix + new tokens. -> o [T, Hq, D]."""
    cu, ctx = _as_list(cu_seqlens), _as_list(context_lens)
    bs = kv_cache.shape[2]
    out = []
    for b in range(len(cu) - 1):
        n = cu[b + 1] - cu[b]
        if n == 0:
            continue
        total = ctx[b] + n
        blocks = block_tables[b, : -(-total // bs)]
        kv = kv_cache[blocks]  # [nb, 2, bs, Hkv, D]
        k = kv[:, 0].reshape(-1, *kv.shape[-2:])[:total]
        v = kv[:, 1].reshape(-1, *kv.shape[-2:])[:total]
        out.append(_attend(q[cu[b] : cu[b + 1]], k.to(q.dtype), v.to(q.dtype), scale, ctx[b]))
    return torch.cat(out) if out else q.new_zeros(q.shape)


def causal_attention(q, k, v, cu_seqlens, scale) -> torch.Tensor:
    """Cache-less varlen causal attention: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D].

    Equal-length sequences (training batches) run as one batched SDPA call; autograd works.
    """
    cu = _as_list(cu_seqlens)
    lens = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    rep = Hq // Hkv
    if len(set(lens)) == 1:
        B, L = len(lens), lens[0]
        qb = q.view(B, L, Hq, D).transpose(1, 2)
        kb = k.view(B, L, Hkv, D).repeat_interleave(rep, dim=2).transpose(1, 2)
        vb = v.view(B, L, Hkv, D).repeat_interleave(rep, dim=2).transpose(1, 2)
        o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)
        return o.transpose(1, 2).reshape(T, Hq, D)
    return torch.cat([
        _attend(q[cu[b] : cu[b + 1]], k[cu[b] : cu[b + 1]], v[cu[b] : cu[b + 1]], scale, 0)
        for b in range(len(lens)) if lens[b] > 0
    ])
