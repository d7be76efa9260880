"""Dense SwiGLU MLP (`gate_proj`, `up_proj`, `down_proj`): the shared expert and the dense layers
(mlp_only_layers / off the sparse step). Under tensor parallelism each rank holds a slice of the
intermediate dim; `reduce_output=False` leaves the partial sum to the caller (the MoE block)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.comm import all_reduce
from ..distributed.parallel_state import tp_size
from ..distributed.sharding import cols, rows


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, reduce_output: bool = True):
        super().__init__()
        self.tp = tp_size()
        self.reduce_output = reduce_output and self.tp > 1
        full, intermediate_size = intermediate_size, intermediate_size // self.tp
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        if self.tp > 1:
            self.gate_proj.tp_shards = self.up_proj.tp_shards = {"weight": rows(full)}
            self.down_proj.tp_shards = {"weight": cols(full)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return all_reduce(y) if self.reduce_output else y
