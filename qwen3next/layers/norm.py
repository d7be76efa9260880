"""Norm modules: zero-centred RMSNorm (weight stored centred at 0) and the DeltaNet gated RMSNorm
(plain weight centred at 1). architecture.md §4.1, §5.7."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import ops


class ZCRMSNorm(nn.Module):
    """y = rms(x) * (1 + weight); forward(x, residual) fuses the residual add (returns (y, x+res))."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.zc_rmsnorm(x, self.weight, self.eps, residual)


class GatedRMSNorm(nn.Module):
    """y = rms(x) * weight * silu(z) over the last dim (one head)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ops.gated_rmsnorm(x, z, self.weight, self.eps)
