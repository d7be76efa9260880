"""Expert-resident prefill expert GEMMs over expert-sorted rows (moe_grouped's "resident" GEMMs).

moe_tma's persistent kernels give each 64-row tile of an expert its own pass over the expert's
weight k-slices, so at ~160 rows an expert's weights stream from L2 to the SMs three times per
column tile. Here one program takes all of an expert's rows -- up to NS sub-tiles of SB rows
(3 x 64 = 192), one accumulator (gate/up: two) per sub-tile -- for one column tile: each k-step's
weight tile comes in once through TMA and feeds every sub-tile's tl.dot. Experts with more rows
take further entries of the table (moe_tma.tile_table at ROWS = NS * SB rows). Same k order and
fp32 accumulation as moe_tma's kernels, so the outputs are bitwise equal to theirs. On the H200
(docs/benchmarks.md, session 6) the down GEMM gained 13% at T = 8192; gate/up lost 13%.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import moe_tma
from ._util import autotune

# sub-tile rows (wgmma's M per warpgroup) and sub-tiles per program (the kernels are written for 3): the
# table's entries are ROWS rows
SB, NS = 64, 3
ROWS = SB * NS


def _set_up_blocks(nargs):
    nargs["b_desc"].block_shape = [nargs["BN"], nargs["BK"]]


def _set_down_blocks(nargs):
    nargs["a_desc"].block_shape = [nargs["SB"], nargs["BK"]]
    nargs["as_desc"].block_shape = [2 * nargs["SB"], nargs["BK"]]
    nargs["b_desc"].block_shape = [nargs["BN"], nargs["BK"]]


def _rconfigs(shapes, hook):
    """(BN, BK, warps, stages, CPS, WS, ARMS, PAIR) -> configs; ARMS: a program with fewer sub-tiles of
    rows runs a body of that many sub-tiles (a scalar branch) instead of masked ones; PAIR: the first
    two sub-tiles as one dot of 2 SB rows. The first is the interpreter's."""
    return [triton.Config({"SB": SB, "NS": NS, "BN": bn, "BK": bk, "CPS": cps, "WS": ws, "ARMS": arms, "PAIR": pair},
                          num_warps=w, num_stages=st, pre_hook=hook) for bn, bk, w, st, cps, ws, arms, pair in shapes]


# accumulators: NS * SB x BN fp32 per dot operand (gate/up: two), 24576 at BN = 64 -- 96 registers a
# thread at 8 warps, 192 at 4. 8 warps split a 64-row dot's columns between the two warpgroups (m64n32
# wgmma at BN = 64, each reading the whole A tile), a 128-row one's rows (PAIR). Shared memory per stage
# BK * (NS * SB + 2 BN) * 2 bytes (40 KB at 64 x 64). First: the H200's winner (session 6, call 2)
_UP_RCONFIGS = _rconfigs(((128, 32, 8, 3, 1, False, True, True), (64, 64, 4, 2, 2, False, True, False),
                          (64, 64, 8, 3, 1, True, False, False), (128, 64, 8, 2, 1, False, True, True),
                          (64, 64, 8, 3, 1, False, True, True), (64, 64, 8, 4, 1, False, True, True),
                          (64, 64, 8, 3, 1, True, False, True)), _set_up_blocks)
# down: one accumulator per sub-tile; per stage BK * (NS * SB + BN) * 2 bytes
_DOWN_RCONFIGS = _rconfigs(((256, 64, 8, 3, 1, False, True, True), (128, 64, 4, 2, 2, False, True, False),
                            (256, 64, 8, 3, 1, False, False, False), (256, 64, 8, 3, 1, False, True, False),
                            (256, 64, 8, 2, 1, False, True, True), (128, 64, 8, 3, 1, False, True, True),
                            (128, 64, 8, 4, 1, False, True, True), (256, 64, 8, 3, 1, True, False, True)),
                           _set_down_blocks)


@triton.jit
def _h_store(h_ptr, r, rend, n, I, acc_g, acc_u):
    """h rows r (those below rend), columns n = silu(gate) * up, rounded as moe_tma's epilogue."""
    dt = h_ptr.dtype.element_ty
    g = acc_g.to(dt).to(tl.float32)
    hv = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * acc_u.to(dt).to(tl.float32)
    tl.store(h_ptr + r[:, None] * I + n[None, :], hv.to(dt), mask=(r < rend)[:, None] & (n < I)[None, :])


@triton.jit
def _gate_up_entry(b_desc, h_ptr, x_ptr, src_ptr, e, row0, rend, n0, H, I, kk, R0: tl.constexpr, R1: tl.constexpr,
                   R2: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Rows row0 .. row0 + R0 + R1 + R2 (stored below rend) of expert e, h columns n0 .. n0 + BN: up to
    three sub-tiles of R0, R1, R2 rows (0: none) sharing each k-step's gate and up weight tiles (x's
    rows gathered through src)."""
    r0 = (row0 + tl.arange(0, R0)).to(tl.int64)
    tok0 = tl.load(src_ptr + r0, mask=r0 < rend, other=0)
    g0 = tl.zeros([R0, BN], dtype=tl.float32)
    u0 = tl.zeros([R0, BN], dtype=tl.float32)
    if R1 > 0:
        r1 = (row0 + R0 + tl.arange(0, R1)).to(tl.int64)
        tok1 = tl.load(src_ptr + r1, mask=r1 < rend, other=0)
        g1 = tl.zeros([R1, BN], dtype=tl.float32)
        u1 = tl.zeros([R1, BN], dtype=tl.float32)
    if R2 > 0:
        r2 = (row0 + R0 + R1 + tl.arange(0, R2)).to(tl.int64)
        tok2 = tl.load(src_ptr + r2, mask=r2 < rend, other=0)
        g2 = tl.zeros([R2, BN], dtype=tl.float32)
        u2 = tl.zeros([R2, BN], dtype=tl.float32)
    wrow = e * 2 * I + n0
    for k0 in range(0, H, BK):
        kmask = ((k0 + kk) < H)[None, :]
        wg = b_desc.load([wrow, k0]).T  # [BK, BN], loaded once for every sub-tile
        wu = b_desc.load([wrow + I, k0]).T
        a = tl.load(x_ptr + tok0[:, None] * H + (k0 + kk)[None, :], mask=kmask, other=0.0)
        g0 = tl.dot(a, wg, g0)
        u0 = tl.dot(a, wu, u0)
        if R1 > 0:
            a = tl.load(x_ptr + tok1[:, None] * H + (k0 + kk)[None, :], mask=kmask, other=0.0)
            g1 = tl.dot(a, wg, g1)
            u1 = tl.dot(a, wu, u1)
        if R2 > 0:
            a = tl.load(x_ptr + tok2[:, None] * H + (k0 + kk)[None, :], mask=kmask, other=0.0)
            g2 = tl.dot(a, wg, g2)
            u2 = tl.dot(a, wu, u2)
    n = n0 + tl.arange(0, BN)
    _h_store(h_ptr, r0, rend, n, I, g0, u0)
    if R1 > 0:
        _h_store(h_ptr, r1, rend, n, I, g1, u1)
    if R2 > 0:
        _h_store(h_ptr, r2, rend, n, I, g2, u2)


@autotune(_UP_RCONFIGS, key=["H", "I", "RB"])
@triton.jit(do_not_specialize=["RB"])
def _gate_up_resident_kernel(b_desc, tile_ptr, h_ptr, x_ptr, src_ptr, H, I, RB, SB: tl.constexpr, NS: tl.constexpr,
                             BN: tl.constexpr, BK: tl.constexpr, CPS: tl.constexpr, WS: tl.constexpr,
                             ARMS: tl.constexpr, PAIR: tl.constexpr):
    """x [T, H] (row r of the sorted order is x[src[r]]), b_desc: gate_up [E*2I, H] -> h [M, I] =
    silu(x W_gate^T) * (x W_up^T); a grid of CPS programs per SM walks the table's (entry, column
    tile) pairs, an entry's column tiles side by side (its x rows shared through L2). NS = 3."""
    NN = tl.cdiv(I, BN)
    total = tl.load(tile_ptr) * NN
    kk = tl.arange(0, BK)
    # PAIR: the first two sub-tiles as one 2 SB-row dot (8 warps then split its rows, not its columns)
    P0: tl.constexpr = 2 * SB if PAIR else SB
    P1: tl.constexpr = 0 if PAIR else SB
    for t in tl.range(tl.program_id(0), total, tl.num_programs(0), flatten=not (WS or ARMS), warp_specialize=WS):
        pm = t // NN
        n0 = (t % NN) * BN
        e = tl.load(tile_ptr + 1 + 3 * pm)
        row0 = tl.load(tile_ptr + 2 + 3 * pm)
        rend = tl.load(tile_ptr + 3 + 3 * pm)
        if ARMS:
            ns = (tl.minimum(rend - row0, NS * SB) + SB - 1) // SB
            if ns >= 3:
                _gate_up_entry(b_desc, h_ptr, x_ptr, src_ptr, e, row0, rend, n0, H, I, kk, P0, SB, P1, BN, BK)
            elif ns == 2:
                _gate_up_entry(b_desc, h_ptr, x_ptr, src_ptr, e, row0, rend, n0, H, I, kk, P0, P1, 0, BN, BK)
            else:
                _gate_up_entry(b_desc, h_ptr, x_ptr, src_ptr, e, row0, rend, n0, H, I, kk, SB, 0, 0, BN, BK)
        else:
            _gate_up_entry(b_desc, h_ptr, x_ptr, src_ptr, e, row0, rend, n0, H, I, kk, P0, SB, P1, BN, BK)


@triton.jit
def _y_store(y_ptr, r, rend, n, H, acc):
    tl.store(y_ptr + r[:, None] * H + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(r < rend)[:, None] & (n < H)[None, :])


@triton.jit
def _down_entry(a_desc, as_desc, b_desc, y_ptr, e, row0, rend, n0, H, I, SB: tl.constexpr, R0: tl.constexpr,
                R1: tl.constexpr, R2: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Rows row0 .. row0 + R0 + R1 + R2 (stored below rend) of expert e, y columns n0 .. n0 + BN: up to
    three sub-tiles (0 rows: none; h through a_desc's SB-row or as_desc's 2 SB-row boxes) sharing each
    k-step's weight tile."""
    y0 = tl.zeros([R0, BN], dtype=tl.float32)
    if R1 > 0:
        y1 = tl.zeros([R1, BN], dtype=tl.float32)
    if R2 > 0:
        y2 = tl.zeros([R2, BN], dtype=tl.float32)
    for k0 in range(0, I, BK):
        w = b_desc.load([e * H + n0, k0]).T  # [BK, BN], loaded once for every sub-tile
        if R0 == SB:
            y0 = tl.dot(a_desc.load([row0, k0]), w, y0)
        else:  # the paired sub-tile
            y0 = tl.dot(as_desc.load([row0, k0]), w, y0)
        if R1 > 0:
            y1 = tl.dot(a_desc.load([row0 + R0, k0]), w, y1)
        if R2 > 0:
            y2 = tl.dot(a_desc.load([row0 + R0 + R1, k0]), w, y2)
    n = n0 + tl.arange(0, BN)
    _y_store(y_ptr, (row0 + tl.arange(0, R0)).to(tl.int64), rend, n, H, y0)
    if R1 > 0:
        _y_store(y_ptr, (row0 + R0 + tl.arange(0, R1)).to(tl.int64), rend, n, H, y1)
    if R2 > 0:
        _y_store(y_ptr, (row0 + R0 + R1 + tl.arange(0, R2)).to(tl.int64), rend, n, H, y2)


@autotune(_DOWN_RCONFIGS, key=["H", "I", "RB"])
@triton.jit(do_not_specialize=["RB"])
def _down_resident_kernel(a_desc, as_desc, b_desc, tile_ptr, y_ptr, H, I, RB, SB: tl.constexpr, NS: tl.constexpr,
                          BN: tl.constexpr, BK: tl.constexpr, CPS: tl.constexpr, WS: tl.constexpr, ARMS: tl.constexpr,
                          PAIR: tl.constexpr):
    """a_desc / as_desc: h [M, I] (SB- / 2 SB-row boxes); b_desc: down [E*H, I] -> y [M, H] = h W_down^T
    (expert-sorted rows), walking the table as _gate_up_resident_kernel."""
    NN = tl.cdiv(H, BN)
    total = tl.load(tile_ptr) * NN
    P0: tl.constexpr = 2 * SB if PAIR else SB
    P1: tl.constexpr = 0 if PAIR else SB
    for t in tl.range(tl.program_id(0), total, tl.num_programs(0), flatten=not (WS or ARMS), warp_specialize=WS):
        pm = t // NN
        n0 = (t % NN) * BN
        e = tl.load(tile_ptr + 1 + 3 * pm)
        row0 = tl.load(tile_ptr + 2 + 3 * pm)
        rend = tl.load(tile_ptr + 3 + 3 * pm)
        if ARMS:
            ns = (tl.minimum(rend - row0, NS * SB) + SB - 1) // SB
            if ns >= 3:
                _down_entry(a_desc, as_desc, b_desc, y_ptr, e, row0, rend, n0, H, I, SB, P0, SB, P1, BN, BK)
            elif ns == 2:
                _down_entry(a_desc, as_desc, b_desc, y_ptr, e, row0, rend, n0, H, I, SB, P0, P1, 0, BN, BK)
            else:
                _down_entry(a_desc, as_desc, b_desc, y_ptr, e, row0, rend, n0, H, I, SB, SB, 0, 0, BN, BK)
        else:
            _down_entry(a_desc, as_desc, b_desc, y_ptr, e, row0, rend, n0, H, I, SB, P0, SB, P1, BN, BK)


def _check(tiles: torch.Tensor) -> None:
    if tiles.dtype != torch.int32 or tiles.dim() != 1:
        raise ValueError("tiles: expected moe_tma.tile_table(counts, M, moe_resident.ROWS) (1-D int32)")


def gate_up(x: torch.Tensor, gate_up_proj: torch.Tensor, src: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """x [T, H], src [M] each expert-sorted row's token, gate_up_proj [E, 2I, H], tiles =
    moe_tma.tile_table(counts, M, ROWS) -> h [M, I] = silu(gate) * up of the sorted rows."""
    _check(tiles)
    M, H = src.shape[0], x.shape[1]
    E, I2, _ = gate_up_proj.shape
    I = I2 // 2
    h = torch.empty(M, I, dtype=x.dtype, device=x.device)
    b = TensorDescriptor(gate_up_proj, [E * I2, H], [H, 1], [1, 1])  # box set by the pre-hook
    _gate_up_resident_kernel[moe_tma._pgrid(x.device, (tiles.shape[0] - 1) // 3, I)](
        b, tiles, h, x, src, H, I, moe_tma._rows_class(M, E))
    return h


def down(h: torch.Tensor, down_proj: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """h [M, I] expert-sorted rows, down_proj [E, H, I], tiles as gate_up's -> y [M, H]."""
    _check(tiles)
    M, I = h.shape
    E, H, _ = down_proj.shape
    y = torch.empty(M, H, dtype=h.dtype, device=h.device)
    a, a2 = TensorDescriptor(h, [M, I], [I, 1], [1, 1]), TensorDescriptor(h, [M, I], [I, 1], [1, 1])
    b = TensorDescriptor(down_proj, [E * H, I], [I, 1], [1, 1])
    _down_resident_kernel[moe_tma._pgrid(h.device, (tiles.shape[0] - 1) // 3, H)](a, a2, b, tiles, y, H, I,
                                                                                  moe_tma._rows_class(M, E))
    return y
