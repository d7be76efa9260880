"""RMSNorm references: the zero-centred RMSNorm of every pre-norm / q-k norm, and the gated
RMSNorm at the DeltaNet output (architecture.md §4.1, §5.7).

Both normalise in fp32 and cast back once, as transformers does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def zc_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """y = rms(x) * (1 + w) over the last dim.

    With `residual`, first forms s = x + residual (in x's dtype) and returns (norm(s), s): the
    fused "add then norm" of a pre-norm block.
    """
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())
    y = y.to(x.dtype)
    return y if residual is None else (y, x)


def gated_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms(x) * w * silu(z) over the last dim (per head); w is a plain weight (centred at 1)."""
    dtype = x.dtype
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    # transformers' order: cast the normalised value back, weight in act dtype, gate in fp32
    y = weight * y
    return (y.float() * F.silu(z.float())).to(dtype)
