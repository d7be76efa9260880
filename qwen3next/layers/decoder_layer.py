"""One pre-norm decoder block (architecture.md §4): ZCRMSNorm -> mixer (gated DeltaNet or gated
attention) -> residual, ZCRMSNorm -> MoE or dense MLP -> residual. The residual add is fused into
the next norm, so a block takes and returns (hidden, residual). Used by the trunk and by MTP."""

from __future__ import annotations

import torch
from torch import nn

from ..config import FULL, ModelConfig
from ..forward_batch import ForwardBatch
from .attention import GatedAttention
from .gated_deltanet import GatedDeltaNet
from .mlp import MLP
from .moe import SparseMoeBlock
from .norm import ZCRMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, layer_type: str, moe: bool, cache_index: int):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == FULL:
            self.self_attn = GatedAttention(cfg, cache_index)
        else:
            self.linear_attn = GatedDeltaNet(cfg, cache_index)
        self.is_moe = moe
        self.mlp = SparseMoeBlock(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = ZCRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = ZCRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                batch: ForwardBatch, router_logits: list | None = None):
        """x [T, H] (output of the previous block, not yet added) -> (mlp output, residual stream)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        if self.layer_type == FULL:
            h = self.self_attn(h, cos, sin, batch)
        else:
            h = self.linear_attn(h, batch)
        h, residual = self.post_attention_layernorm(h, residual)
        if self.is_moe:
            h, logits = self.mlp(h)
            if router_logits is not None:
                router_logits.append(logits)
        else:
            h = self.mlp(h)
        return h, residual
