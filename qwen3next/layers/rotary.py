"""Rotary embedding module: holds the (YaRN-aware) frequency table of one RopeConfig and turns
positions into cos/sin once per forward (architecture.md §6.3-6.4). No parameters, no buffers
in the state dict; the table is rebuilt lazily per device."""

from __future__ import annotations

import torch
from torch import nn

from ..config import RopeConfig
from ..kernels import ops


class RotaryEmbedding(nn.Module):
    def __init__(self, rope: RopeConfig):
        super().__init__()
        self.rope = rope
        self.rotary_dim = rope.rotary_dim
        self._inv_freq, self.attention_factor = ops.rope_inv_freq(rope)
        self._by_device: dict[str, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [T] -> (cos, sin) [T, rotary_dim] in `dtype`."""
        key = str(positions.device)
        if key not in self._by_device:
            self._by_device[key] = self._inv_freq.to(positions.device)
        return ops.rope_cos_sin(positions, self._by_device[key], self.attention_factor, dtype)
