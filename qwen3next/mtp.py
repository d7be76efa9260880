"""The multi-token-prediction head `mtp.*` (architecture.md §8.1).

Given the trunk's final hidden h_t (after model.norm) and the next token x_{t+1}:
z = fc([ZCRMSNorm(embed(x_{t+1})) ; ZCRMSNorm(h_t)]), then full-attention + MoE decoder layer(s)
with their own KV cache (ModelCache.kv[num_hidden_layers + i]), then mtp.norm. Embedding and
lm_head are the trunk's (not stored under mtp.*); logits come from the trunk's compute_logits.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import FULL, ModelConfig
from .forward_batch import ForwardBatch
from .kernels import ops
from .layers.decoder_layer import DecoderLayer
from .layers.fused import DerivedWeight
from .layers.norm import ZCRMSNorm


class Qwen3NextMTP(nn.Module):
    def __init__(self, cfg: ModelConfig, trunk: nn.Module):
        super().__init__()
        H = cfg.hidden_size
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.pre_fc_norm_embedding = ZCRMSNorm(H, cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = ZCRMSNorm(H, cfg.rms_norm_eps)
        self.norm = ZCRMSNorm(H, cfg.rms_norm_eps)
        # CPU inference: the two pre-fc norms as one norm over [T, 2, H] with a weight per half
        self._pre_fc = DerivedWeight(lambda we, wh: torch.stack([we, wh]))  # [2, H]
        # the MoE rule of trunk layer 0 applies (§8.1); KV cache index follows the trunk's layers
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, 0, FULL, cfg.is_moe_layer(0), cache_index=cfg.num_hidden_layers + i)
            for i in range(max(cfg.num_mtp_layers, 1))
        )
        self._trunk = (trunk,)  # a tuple: shared, not registered (no mtp.model.* names)

    def forward(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """next_ids [T] (token after each position), hidden [T, H] (trunk output after model.norm
        or the MTP's own previous output) -> [T, H] after mtp.norm; logits via trunk.compute_logits."""
        trunk = self._trunk[0]
        e = trunk.model.embed_tokens(next_ids)
        if ops.cpu_fast_ok(hidden, self.fc.weight):  # the same values in two calls instead of five
            w = self._pre_fc.get(self.pre_fc_norm_embedding.weight, self.pre_fc_norm_hidden.weight)
            c = ops.zc_rmsnorm(torch.stack([e, hidden], 1), w, self.pre_fc_norm_embedding.eps)  # [T, 2, H]
            x = ops.linear(c.view(c.shape[0], -1), self.fc.weight)
        else:
            c = torch.cat([self.pre_fc_norm_embedding(e), self.pre_fc_norm_hidden(hidden)], dim=-1)
            x = self.fc(c)
        cos, sin = trunk.rotary(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, batch)
        out, _ = self.norm(x, residual)
        return out
