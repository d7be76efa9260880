"""Triton RMSNorms: zero-centred (optionally fused with the residual add) and gated (DeltaNet out).

Same signatures as kernels/norm.py. Rows (the last axis) are normalised in fp32 and cast once at
the end, as the spec's §4.1 / §5.7 do. Short rows (per-head norms: 128 / 256 wide) go several to a
program, and a per-head input may be a strided view ([T, heads, D] slice of a wider projection,
e.g. the query half of q_proj's [query | gate]): it is read in place, not copied first.
The gated norm's row math (`gated_rows`) is shared with the delta rule's output kernel, which can
apply it in its epilogue (delta_rule.py): its sum of squares is exact in fp64, so both give the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import pow2


def _rows_per_program(R: int, D: int) -> int:
    """Short rows go several to a program (~4K elements) once there are enough rows to fill the
    GPU; a few rows (decode) or long rows get a program each."""
    if D >= 1024:
        return 1
    br = max(1, min(64, 4096 // pow2(D)))
    while br > 1 and R < br * 264:  # keep >= 2 programs per SM
        br //= 2
    return br


# (strides specialised, as the gated kernel's below: 16-byte loads)
@triton.jit(do_not_specialize=["R", "NH"])
def _zc_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, R, D, NH, S0, S1, eps,
                       HAS_RES: tl.constexpr, BR: tl.constexpr, BLOCK: tl.constexpr):
    r32 = tl.program_id(0) * BR + tl.arange(0, BR)                   # [BR] flat row (int32, as below)
    row = r32.to(tl.int64)
    rm = row < R
    offs = tl.arange(0, BLOCK)
    mask = rm[:, None] & (offs < D)[None, :]
    # row (t, head) of a [T, NH, D] view with strides (S0, S1, 1)
    xq = r32 // NH
    xo = xq.to(tl.int64) * S0 + (r32 - xq * NH).to(tl.int64) * S1
    x = tl.load(x_ptr + xo[:, None] + offs[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row[:, None] * D + offs[None, :], mask=mask, other=0.0)
        # the residual stream is kept in the activation dtype: round the sum before normalising
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + row[:, None] * D + offs[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / D + eps)
    w = tl.load(w_ptr + offs, mask=offs < D, other=0.0).to(tl.float32)
    y = xf * inv[:, None] * (1.0 + w)[None, :]
    tl.store(y_ptr + row[:, None] * D + offs[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _row_view(x: torch.Tensor):
    """-> (x or a contiguous copy, NH, S0, S1): row r of the [R, D] rows lies at
    (r // NH) * S0 + (r % NH) * S1."""
    D = x.shape[-1]
    if x.dim() == 3 and x.stride(-1) == 1:
        return x, x.shape[1], x.stride(0), x.stride(1)
    if x.dim() == 2 and x.stride(-1) == 1:
        return x, 1, x.stride(0), 0
    return x.contiguous(), 1, D, 0


def zc_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """y = rms(x) * (1 + w) over the last axis; with `residual`: h = x + residual, returns (rms(h)*(1+w), h)."""
    D = x.shape[-1]
    R = x.numel() // D if D else 0
    if residual is not None:
        xs, NH, S0, S1 = x.contiguous(), 1, D, 0
    else:
        xs, NH, S0, S1 = _row_view(x)
    if R >= 2 ** 31 - 64:
        raise ValueError(f"zc_rmsnorm: {R} rows, at most 2^31 - 64")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if residual is not None else y
    r = residual.contiguous() if residual is not None else y
    if R:
        BR = _rows_per_program(R, D)
        _zc_rmsnorm_kernel[(triton.cdiv(R, BR),)](xs, r, weight, y, h, R, D, NH, S0, S1, eps,
                                                  HAS_RES=residual is not None, BR=BR, BLOCK=pow2(D),
                                                  num_warps=4 if D <= 4096 else 8)
    if residual is None:
        return y
    return y, h


@triton.jit
def _sum_sq_rows(x):
    """sum(x * x, axis=1) of fp32 rows, accumulated in fp64: every square is exact there, and so is
    the sum while a row's magnitudes span less than 2^15 (any bf16 row of sane values), so the bits
    do not depend on the order tl.sum takes, which follows the register layout: the norm kernel
    (blocked loads) and the delta rule's epilogue (MMA tiles) agree. (A fixed fp32 add tree made
    Triton hold whole rows per thread, 16 lanes doing the same work.)"""
    xd = x.to(tl.float64)
    return tl.sum(xd * xd, axis=1).to(tl.float32)


@triton.jit
def gated_rows(x, z, w_ptr, offs, D, eps):
    """The gated RMSNorm of [BR, BLOCK] rows x (any float dtype) with gates z: rms(x) * w * silu(z)
    in fp32 (columns offs, D of them valid; masked columns of x must be 0)."""
    x = x.to(tl.float32)
    z = z.to(tl.float32)
    w = tl.load(w_ptr + offs, mask=offs < D, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(_sum_sq_rows(x) / D + eps)
    return x * inv[:, None] * w[None, :] * (z / (1.0 + tl.exp(-z)))


# (the strides are specialised: their divisibility by 16 lets x / z load 16 bytes a thread; unspecialised,
# sm_90 got 2-byte loads)
@triton.jit(do_not_specialize=["R", "XNH", "ZNH"])
def _gated_rmsnorm_kernel(x_ptr, z_ptr, w_ptr, y_ptr, R, D, XNH, XS0, XS1, ZNH, ZS0, ZS1, eps,
                          BR: tl.constexpr, BLOCK: tl.constexpr):
    r32 = tl.program_id(0) * BR + tl.arange(0, BR)  # (int32: a 64-bit division is a long software routine)
    row = r32.to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = (row < R)[:, None] & (offs < D)[None, :]
    # rows of [*, NH, D] views with strides (S0, S1, 1), x and z each their own
    xq, zq = r32 // XNH, r32 // ZNH
    xo = xq.to(tl.int64) * XS0 + (r32 - xq * XNH).to(tl.int64) * XS1
    zo = zq.to(tl.int64) * ZS0 + (r32 - zq * ZNH).to(tl.int64) * ZS1
    x = tl.load(x_ptr + xo[:, None] + offs[None, :], mask=mask, other=0.0)
    z = tl.load(z_ptr + zo[:, None] + offs[None, :], mask=mask, other=0.0)
    y = gated_rows(x, z, w_ptr, offs, D, eps)
    tl.store(y_ptr + row[:, None] * D + offs[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def gated_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms(x) * w * silu(z) over the last axis (one head per row), all in fp32, output in x's dtype
    (contiguous, x's shape). x and z may be strided [T, heads, D] views (unit last stride): read in
    place, e.g. z as a slice of the DeltaNet's grouped in_proj_qkvz output."""
    D = x.shape[-1]
    if z.shape != x.shape:
        raise ValueError(f"gated_rmsnorm: z shape {tuple(z.shape)} != x shape {tuple(x.shape)}")
    xs, XNH, XS0, XS1 = _row_view(x)
    zs, ZNH, ZS0, ZS1 = _row_view(z)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    R = x.numel() // D if D else 0
    if R >= 2 ** 31 - 64:
        raise ValueError(f"gated_rmsnorm: {R} rows, at most 2^31 - 64")
    if R:
        BR = _rows_per_program(R, D)
        _gated_rmsnorm_kernel[(triton.cdiv(R, BR),)](xs, zs, weight, y, R, D, XNH, XS0, XS1, ZNH, ZS0, ZS1, eps,
                                                     BR=BR, BLOCK=pow2(D), num_warps=4)
    return y
