"""Mixture-of-experts references (architecture.md §7): softmax top-k routing and the routed
expert computation over the stacked expert weights.

The expert loop visits only experts that received tokens and scatters results with index_add,
so cost scales with active experts, not with E.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """router_logits [T, E] -> (weights [T, k] fp32, ids [T, k] long)."""
    p = torch.softmax(router_logits.float(), dim=-1)
    w, ids = torch.topk(p, top_k, dim=-1)
    if norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids


def moe_experts(x, gate_up_proj, down_proj, weights, ids) -> torch.Tensor:
    """x [T, H]; gate_up_proj [E, 2I, H]; down_proj [E, H, I]; weights/ids [T, k] -> [T, H]."""
    inter = down_proj.shape[-1]

    def expert(e: int, xe: torch.Tensor) -> torch.Tensor:
        gu = xe @ gate_up_proj[e].t()  # [n, 2I]
        return (F.silu(gu[:, :inter]) * gu[:, inter:]) @ down_proj[e].t()  # [n, H]

    return moe_experts_by(x, weights, ids, gate_up_proj.shape[0], expert)


def moe_experts_by(x, weights, ids, num_experts: int, expert) -> torch.Tensor:
    """The routed sum with `expert(e, xe [n, H]) -> [n, H]` (x's dtype) as each expert's MLP: tokens
    grouped by expert, each output scaled by its routing weight, the k choices summed in fp32."""
    T, k = ids.shape
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # assignments grouped by expert
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    tok_of = order // k  # [T*k] token index of each sorted assignment
    w_sorted = weights.reshape(-1)[order].to(x.dtype)
    out = torch.zeros(T, x.shape[-1], dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = tok_of[start : start + n]
        ye = expert(e, x.index_select(0, tok)) * w_sorted[start : start + n, None]  # [n, H]
        out = out.index_add(0, tok, ye.float())
        start += n
    return out.to(x.dtype)
