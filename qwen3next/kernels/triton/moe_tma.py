"""Triton grouped GEMMs over expert-sorted rows with TMA tensor descriptors: the in-house
alternative to torch._grouped_mm for the prefill MoE (moe_grouped.py sorts the rows).

A program takes BM sorted rows of one expert (found in the kernel from the per-expert counts: no
tile table, no host sync) and BN output columns; the A rows and the weight tiles come in through
TMA boxes (rows past the expert's end belong to the next expert or are zero-filled: computed,
never stored). Gate/up holds two accumulators and writes h = silu(gate) * up directly (no [M, 2I]
intermediate); down writes the expert-sorted y that moe_grouped's unsort-sum reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._util import autotune, pow2


def _set_blocks(nargs):
    """Autotune pre-hook: the descriptors' boxes follow the config's tile sizes."""
    nargs["a_desc"].block_shape = [nargs["BM"], nargs["BK"]]
    nargs["b_desc"].block_shape = [nargs["BN"], nargs["BK"]]


def _configs(shapes):
    """(BM, BN, BK, warps, stages) -> autotune configs; the first is the interpreter's."""
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st, pre_hook=_set_blocks)
            for bm, bn, bk, w, st in shapes]


# gate/up loads two weight tiles per step (gate and up columns): its shared memory per stage is
# BK * (BM + 2 BN) * 2 bytes, at most 227 KB over the stages
_UP_CONFIGS = _configs(((64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 4),
                        (64, 256, 64, 8, 3), (64, 64, 128, 4, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 5),
                        (128, 64, 64, 4, 6)))
_DOWN_CONFIGS = _configs(((64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 256, 64, 8, 3),
                          (128, 128, 128, 8, 3), (128, 64, 64, 4, 4), (64, 256, 64, 8, 4), (128, 256, 64, 8, 4),
                          (128, 128, 64, 8, 5)))


@triton.jit
def _tile(cnt_ptr, pm, E, BM: tl.constexpr, BE: tl.constexpr):
    """Row tile pm of the expert-sorted rows -> (expert (E past the last tile), first row, end row
    of that expert)."""
    ee = tl.arange(0, BE)
    cnt = tl.load(cnt_ptr + ee, mask=ee < E, other=0).to(tl.int32)  # (TMA offsets are 32-bit)
    nt = (cnt + BM - 1) // BM
    tend = tl.cumsum(nt, 0)
    e = tl.sum((tend <= pm).to(tl.int32), 0)
    sel = ee == e
    rend = tl.sum(tl.where(ee <= e, cnt, 0), 0)
    row0 = rend - tl.sum(tl.where(sel, cnt, 0), 0) + (pm - tl.sum(tl.where(sel, tend - nt, 0), 0)) * BM
    return e, row0, rend


@autotune(_UP_CONFIGS, key=["H", "I", "RB", "GATHER"])
@triton.jit(do_not_specialize=["RB"])
def _gate_up_kernel(a_desc, b_desc, cnt_ptr, h_ptr, x_ptr, src_ptr, E, H, I, RB,
                    BE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GATHER: tl.constexpr):
    """a_desc: xs [M, H]; b_desc: gate_up [E*2I, H] -> h [M, I] = silu(xs W_gate^T) * (xs W_up^T).
    GATHER: row r of xs is x [T, H] row src[r], loaded by pointers (a_desc unused)."""
    NN = tl.cdiv(I, BN)
    pm = tl.program_id(0) // NN
    n0 = (tl.program_id(0) % NN) * BN
    e, row0, rend = _tile(cnt_ptr, pm, E, BM, BE)
    if e < E:
        acc_g = tl.zeros([BM, BN], dtype=tl.float32)
        acc_u = tl.zeros([BM, BN], dtype=tl.float32)
        wrow = e * 2 * I + n0
        r = (row0 + tl.arange(0, BM)).to(tl.int64)
        if GATHER:
            tok = tl.load(src_ptr + r, mask=r < rend, other=0)
        kk = tl.arange(0, BK)
        for k0 in range(0, H, BK):
            if GATHER:
                a = tl.load(x_ptr + tok[:, None] * H + (k0 + kk)[None, :], mask=((k0 + kk) < H)[None, :], other=0.0)
            else:
                a = a_desc.load([row0, k0])
            acc_g = tl.dot(a, b_desc.load([wrow, k0]).T, acc_g)
            acc_u = tl.dot(a, b_desc.load([wrow + I, k0]).T, acc_u)
        dt = h_ptr.dtype.element_ty
        # round like the reference (products in the activation dtype, then the gate)
        g = acc_g.to(dt).to(tl.float32)
        hv = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * acc_u.to(dt).to(tl.float32)
        n = n0 + tl.arange(0, BN)
        tl.store(h_ptr + r[:, None] * I + n[None, :], hv.to(dt), mask=(r < rend)[:, None] & (n < I)[None, :])


@autotune(_DOWN_CONFIGS, key=["H", "I", "RB"])
@triton.jit(do_not_specialize=["RB"])
def _down_kernel(a_desc, b_desc, cnt_ptr, y_ptr, E, H, I, RB,
                 BE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """a_desc: h [M, I]; b_desc: down [E*H, I] -> y [M, H] = h W_down^T (expert-sorted rows)."""
    NN = tl.cdiv(H, BN)
    pm = tl.program_id(0) // NN
    n0 = (tl.program_id(0) % NN) * BN
    e, row0, rend = _tile(cnt_ptr, pm, E, BM, BE)
    if e < E:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, I, BK):
            acc = tl.dot(a_desc.load([row0, k0]), b_desc.load([e * H + n0, k0]).T, acc)
        r = (row0 + tl.arange(0, BM)).to(tl.int64)
        n = n0 + tl.arange(0, BN)
        tl.store(y_ptr + r[:, None] * H + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(r < rend)[:, None] & (n < H)[None, :])


def _rows_class(M: int, E: int) -> int:
    """Autotuning key: mean rows per expert rounded up to a power of two (tiles are timed once per
    class; a prefill of 8K tokens at top-10 of 512 is class 256, one of 512 tokens class 16)."""
    return pow2(max(1, M // E), 1)


def _grid(M: int, E: int, N: int):
    return lambda meta: ((triton.cdiv(M, meta["BM"]) + min(E, M)) * triton.cdiv(N, meta["BN"]),)


def gate_up(xs: torch.Tensor, gate_up_proj: torch.Tensor, counts: torch.Tensor,
            src: torch.Tensor | None = None) -> torch.Tensor:
    """xs [M, H] expert-sorted rows (or, with src [M], x [T, H] and each sorted row's token),
    gate_up_proj [E, 2I, H], counts [E] rows per expert -> h [M, I]."""
    M, H = xs.shape if src is None else (src.shape[0], xs.shape[1])
    E, I2, _ = gate_up_proj.shape
    I = I2 // 2
    h = torch.empty(M, I, dtype=xs.dtype, device=xs.device)
    dummy = [1, 1]  # boxes set by the pre-hook
    a = TensorDescriptor(xs, list(xs.shape), [H, 1], dummy)
    b = TensorDescriptor(gate_up_proj, [E * I2, H], [H, 1], dummy)
    _gate_up_kernel[_grid(M, E, I)](a, b, counts, h, xs, counts if src is None else src, E, H, I, _rows_class(M, E),
                                    BE=pow2(E), GATHER=src is not None)
    return h


def down(h: torch.Tensor, down_proj: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """h [M, I] expert-sorted rows, down_proj [E, H, I] -> y [M, H]."""
    M, I = h.shape
    E, H, _ = down_proj.shape
    y = torch.empty(M, H, dtype=h.dtype, device=h.device)
    dummy = [1, 1]
    a = TensorDescriptor(h, [M, I], [I, 1], dummy)
    b = TensorDescriptor(down_proj, [E * H, I], [I, 1], dummy)
    _down_kernel[_grid(M, E, H)](a, b, counts, y, E, H, I, _rows_class(M, E), BE=pow2(E))
    return y
