"""Triton RMSNorms: zero-centred (optionally fused with the residual add) and gated (DeltaNet out).

Same signatures as kernels/norm.py. One program normalises one row (the last axis) in fp32 and
casts once at the end, as the spec's §4.1 / §5.7 do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import pow2


@triton.jit
def _zc_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, D, eps,
                       HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * D + offs, mask=mask, other=0.0)
        # the residual stream is kept in the activation dtype: round the sum before normalising
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + row * D + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + offs, (xf * inv * (1.0 + w)).to(y_ptr.dtype.element_ty), mask=mask)


def zc_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """y = rms(x) * (1 + w) over the last axis; with `residual`: h = x + residual, returns (rms(h)*(1+w), h)."""
    D = x.shape[-1]
    xf = x.contiguous().view(-1, D)
    y = torch.empty_like(xf)
    h = torch.empty_like(xf) if residual is not None else y
    r = residual.contiguous().view(-1, D) if residual is not None else xf
    if xf.shape[0]:
        _zc_rmsnorm_kernel[(xf.shape[0],)](xf, r, weight, y, h, D, eps,
                                           HAS_RES=residual is not None, BLOCK=pow2(D),
                                           num_warps=4 if D <= 4096 else 8)
    if residual is None:
        return y.view(x.shape)
    return y.view(x.shape), h.view(x.shape)


@triton.jit
def _gated_rmsnorm_kernel(x_ptr, z_ptr, w_ptr, y_ptr, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    y = x * inv * w * (z / (1.0 + tl.exp(-z)))
    tl.store(y_ptr + row * D + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def gated_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms(x) * w * silu(z) over the last axis (one head per row), all in fp32, output in x's dtype."""
    D = x.shape[-1]
    xf = x.contiguous().view(-1, D)
    zf = z.contiguous().view(-1, D)
    y = torch.empty_like(xf)
    if xf.shape[0]:
        _gated_rmsnorm_kernel[(xf.shape[0],)](xf, zf, weight, y, D, eps, BLOCK=pow2(D), num_warps=4)
    return y.view(x.shape)
