"""Triton partial NeoX rotary embedding: the same signature and rounding as kernels/rotary.py's
`apply_rotary`, in one launch (the reference takes six torch ops, each a pass over q or k).

x [T, heads, D] (any strides with a unit last stride: read in place); cos / sin [T, d], d <= D.
out[..., :d] = x_rot * cos + rotate_half(x_rot) * sin, each product rounded to x's dtype as
torch does, out[..., d:] = x[..., d:]. Several (token, head) rows per program. `norm_rotary`
applies the zero-centred RMSNorm of each head first, in the same pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import pow2


@triton.jit(do_not_specialize=["R", "NH", "S0", "S1"])
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, w_ptr, eps, R, NH, S0, S1, D, d,
                   HAS_NORM: tl.constexpr, BR: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)      # [BR] flat (token, head) row
    rm = row < R
    t = row // NH
    xo = t * S0 + (row % NH) * S1
    i = tl.arange(0, BLOCK)
    m = rm[:, None] & (i < D)[None, :]
    x = tl.load(x_ptr + xo[:, None] + i[None, :], mask=m, other=0.0)
    rot = i < d
    half = d // 2
    # rotate_half: (-x2, x1) over the first d dims
    j = tl.where(i < half, i + half, i - half)
    mr = rm[:, None] & rot[None, :]
    xp = tl.load(x_ptr + xo[:, None] + j[None, :], mask=mr, other=0.0)
    dt = y_ptr.dtype.element_ty
    if HAS_NORM:
        # the zero-centred RMSNorm first, rounded to x's dtype as the separate norm's output is
        xf = x.to(tl.float32)
        inv = (1.0 / tl.sqrt(tl.sum(xf * xf, 1) / D + eps))[:, None]
        w = tl.load(w_ptr + i, mask=i < D, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + j, mask=rot, other=0.0).to(tl.float32)
        x = (xf * inv * (1.0 + w)[None, :]).to(dt)
        xp = (xp.to(tl.float32) * inv * (1.0 + wp)[None, :]).to(dt)
    xp = tl.where((i < half)[None, :], -xp, xp)
    c = tl.load(cos_ptr + t[:, None] * d + i[None, :], mask=mr, other=0.0)
    s = tl.load(sin_ptr + t[:, None] * d + i[None, :], mask=mr, other=0.0)
    a = (x.to(tl.float32) * c.to(tl.float32)).to(dt).to(tl.float32)
    b = (xp.to(tl.float32) * s.to(tl.float32)).to(dt).to(tl.float32)
    y = tl.where(rot[None, :], (a + b).to(dt), x.to(dt))
    tl.store(y_ptr + row[:, None] * D + i[None, :], y, mask=m)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, d] with d <= D: rotate x[..., :d], pass the rest through."""
    return _rotary(x, cos, sin, None, 0.0)


def norm_rotary(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary(zc_rmsnorm(x, weight, eps), cos, sin) in one pass (attention's q / k: the
    normalised heads are never written out)."""
    return _rotary(x, cos, sin, weight, eps)


def _rotary(x, cos, sin, weight, eps):
    T, NH, D = x.shape
    d = cos.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    R = T * NH
    if R:
        BR = max(1, min(64, 4096 // pow2(D)))
        _rotary_kernel[(triton.cdiv(R, BR),)](x, cos.contiguous(), sin.contiguous(), y,
                                              weight if weight is not None else cos, eps, R, NH, x.stride(0),
                                              x.stride(1), D, d, HAS_NORM=weight is not None, BR=BR,
                                              BLOCK=pow2(D), num_warps=4)
    return y
