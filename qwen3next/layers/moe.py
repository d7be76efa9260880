"""Sparse MoE block (architecture.md §7): router `gate`, stacked routed experts
(`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]), an always-on `shared_expert`
with a per-token sigmoid `shared_expert_gate`.

For tensor/expert parallelism later, `Experts` may hold a slice of the experts; routing stays global.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..kernels import ops
from .mlp import MLP


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return ops.moe_experts(x, self.gate_up_proj, self.down_proj, weights, ids)


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (out [T, H], router_logits [T, E])."""
        router_logits = self.gate(x)
        weights, ids = ops.moe_route(router_logits, self.top_k, self.norm_topk_prob)
        routed = self.experts(x, weights, ids)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return routed + shared, router_logits
