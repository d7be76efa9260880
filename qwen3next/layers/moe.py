"""Sparse MoE block (architecture.md §7): router `gate`, stacked routed experts
(`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]), an always-on `shared_expert`
with a per-token sigmoid `shared_expert_gate`.

Expert parallelism: each rank holds E/N consecutive experts and the shared expert's slice of the
intermediate dim; every rank routes all tokens, computes its experts' share and the partial
shared expert, and one all-reduce sums the ranks' outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..distributed.comm import all_reduce
from ..distributed.parallel_state import tp_rank, tp_size
from ..distributed.sharding import rows
from ..kernels import ops
from .fused import DerivedWeight
from .mlp import MLP
from .quant import fused_fp8_shared


# tensor parallel: batches up to this many tokens (decode steps, the CUDA graphs' sizes) take the
# masked expert path; its wasted rows (other ranks' choices) cost less than nonzero's host sync
LOCAL_MASKED_MAX_TOKENS = 512


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.tp = tp_size()
        num_experts //= self.tp
        self.first_expert = tp_rank() * num_experts  # global id of local expert 0
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        if self.tp > 1:
            self.tp_shards = {"gate_up_proj": rows(num_experts * self.tp), "down_proj": rows(num_experts * self.tp)}

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gated=None) -> torch.Tensor:
        """`gated` = (sh [T, H], g [T, 1]): + sigmoid(g) * sh (the block's shared expert; on CUDA's
        expert-sorted path in the same pass as the sum over each token's k experts)."""
        if self.tp > 1:
            out = self._forward_local(x, weights, ids)
            return out if gated is None else out + torch.sigmoid(gated[1]) * gated[0]
        if self.gate_up_proj.dtype == torch.float8_e4m3fn:  # block-FP8 experts (layers/quant.py)
            return ops.moe_experts_fp8(x, self.gate_up_proj, self.gate_up_proj_scale_inv, self.down_proj,
                                       self.down_proj_scale_inv, weights, ids, self.block, gated=gated)
        return ops.moe_experts(x, self.gate_up_proj, self.down_proj, weights, ids, gated=gated)

    def _forward_local(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This rank's experts only: decode-sized CUDA batches by _forward_masked; otherwise the
        (token, choice) pairs routed here are gathered as one-choice rows (a host sync, no wasted rows)."""
        # (CPU's dense expert path scatters weights per expert id: it needs a token's ids distinct)
        if x.is_cuda and x.shape[0] <= LOCAL_MASKED_MAX_TOKENS:
            return self._forward_masked(x, weights, ids)
        local = ids - self.first_expert  # [T, k]
        tok, choice = torch.nonzero((local >= 0) & (local < self.num_experts), as_tuple=True)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # k choices summed in fp32
        if tok.numel():
            y = ops.moe_experts(x[tok], self.gate_up_proj, self.down_proj, weights[tok, choice, None],
                                local[tok, choice, None])  # [n, H]
            out.index_add_(0, tok, y.float())
        return out.to(x.dtype)

    def _forward_masked(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Other ranks' choices weigh 0 on local expert 0: fixed shapes, no host sync, so CUDA graphs
        capture it (the GPU kernels take each (token, choice) on its own, repeated ids included)."""
        local = ids - self.first_expert  # [T, k]
        mine = (local >= 0) & (local < self.num_experts)
        return ops.moe_experts(x, self.gate_up_proj, self.down_proj, torch.where(mine, weights, 0.0),
                               torch.where(mine, local, 0))


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, reduce_output=False)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        # CPU inference: the shared expert (and the routed experts, when every expert on every token
        # is cheaper than routing) as one matmul up and one down (fused.py)
        self._up = DerivedWeight(lambda g, u, sg: torch.cat([g, u, sg]))  # [2Is + 1, H]
        self._up_dense = DerivedWeight(lambda g, u, sg, gu, r: torch.cat([g, u, sg, gu.flatten(0, 1), r]))
        self._down_dense = DerivedWeight(lambda d, sd: torch.cat([d.transpose(1, 2).flatten(0, 1), sd.t()]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (out [T, H], router_logits [T, E])."""
        if self.experts.tp == 1 and ops.cpu_fast_ok(x, self.gate.weight):
            return self._forward_cpu(x)
        router_logits = self.gate(x)
        weights, ids = ops.moe_route(router_logits, self.top_k, self.norm_topk_prob)
        ex, se = self.experts, self.shared_expert
        sh8 = fused_fp8_shared(self, x)  # fp8 experts and fp8 shared expert: one call (layers/quant.py)
        if sh8 is not None:
            return ops.moe_experts_fp8(x, ex.gate_up_proj, ex.gate_up_proj_scale_inv, ex.down_proj,
                                       ex.down_proj_scale_inv, weights, ids, ex.block, shared=sh8), router_logits
        shared_w = (se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight, self.shared_expert_gate.weight)
        if (ex.tp == 1 and ops.moe_experts_shared_ok(x, ex.gate_up_proj, self.top_k)
                and all(w.dtype == x.dtype for w in shared_w)):  # (fp8 layers keep their own path)
            # decode / verify on CUDA: the shared expert and its gate ride along in the routed
            # experts' kernels, one more assignment per token (no ~9 separate launches)
            return ops.moe_experts_shared(x, ex.gate_up_proj, ex.down_proj, weights, ids, *shared_w), router_logits
        # routed + sigmoid(gate) * shared, the gated add inside the experts' last pass where it can be
        out = self.experts(x, weights, ids, gated=(self.shared_expert(x), self.shared_expert_gate(x)))
        if self.experts.tp > 1:  # each rank added its experts' and its shared-expert slice's share
            out = all_reduce(out)
        return out, router_logits

    def _forward_cpu(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same sum as forward: the shared expert's sigmoid gate scales its hidden activation
        (down_proj is linear), so shared and routed outputs leave through one down matmul. Dense
        (every expert on every token, when cheaper than routing): one matmul up, which also yields
        the router logits, the routing and activations in one op, one matmul down."""
        ex = self.experts
        T, E, inter = x.shape[0], ex.num_experts, ex.intermediate_size
        se = self.shared_expert
        Is = se.gate_proj.weight.shape[0]  # shared expert's intermediate size
        shared = (se.gate_proj.weight, se.up_proj.weight, self.shared_expert_gate.weight)
        if ops.moe_dense_pays(T, E, self.top_k, x.shape[1], inter):
            y = x @ self._up_dense.get(*shared, ex.gate_up_proj, self.gate.weight).t()  # [T, 2Is+1 + E*2I + E]
            h = ops.moe_dense_act(y, Is, E, inter, self.top_k, self.norm_topk_prob)  # [T, E*I + Is]
            return h @ self._down_dense.get(ex.down_proj, se.down_proj.weight), y[:, -E:]
        router_logits = ops.linear(x, self.gate.weight)
        weights, ids = ops.moe_route(router_logits, self.top_k, self.norm_topk_prob)
        y = ops.linear(x, self._up.get(*shared))  # [T, 2Is + 1]
        hs = F.silu(y[:, :Is]).mul_(y[:, Is : 2 * Is]).mul_(torch.sigmoid(y[:, 2 * Is :]))  # [T, Is]
        routed = ops.moe_experts(x, ex.gate_up_proj, ex.down_proj, weights, ids)
        return routed + ops.linear(hs, se.down_proj.weight), router_logits
