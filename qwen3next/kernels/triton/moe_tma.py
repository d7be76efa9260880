"""Triton grouped GEMMs over expert-sorted rows with TMA tensor descriptors: the in-house
alternative to torch._grouped_mm for the prefill MoE (moe_grouped.py sorts the rows).

A program takes BM sorted rows of one expert (found in the kernel from the per-expert counts: no
tile table, no host sync) and BN output columns; the A rows and the weight tiles come in through
TMA boxes (rows past the expert's end belong to the next expert or are zero-filled: computed,
never stored). Gate/up holds two accumulators and writes h = silu(gate) * up directly (no [M, 2I]
intermediate); down writes the expert-sorted y that moe_grouped's unsort-sum reads. The persistent
forms walk a table of tiles instead (tile_table); the mixed ones give its tiles one of two heights.
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


@triton.jit
def _gate_up_tile(a_desc, b_desc, h_ptr, x_ptr, src_ptr, e, row0, rend, n0, H, I, BM: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, GATHER: tl.constexpr):
    """One [BM, BN] tile of h: sorted rows row0.. (stored below rend) of expert e, columns n0.."""
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
        _gate_up_tile(a_desc, b_desc, h_ptr, x_ptr, src_ptr, e, row0, rend, n0, H, I, BM, BN, BK, GATHER)


@triton.jit
def _down_tile(a_desc, b_desc, y_ptr, e, row0, rend, n0, H, I, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr):
    """One [BM, BN] tile of y: sorted rows row0.. (stored below rend, a_desc's box BM rows) of expert e."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, I, BK):
        acc = tl.dot(a_desc.load([row0, k0]), b_desc.load([e * H + n0, k0]).T, acc)
    r = (row0 + tl.arange(0, BM)).to(tl.int64)
    n = n0 + tl.arange(0, BN)
    tl.store(y_ptr + r[:, None] * H + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(r < rend)[:, None] & (n < H)[None, :])


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
        _down_tile(a_desc, b_desc, y_ptr, e, row0, rend, n0, H, I, BM, BN, BK)


# persistent kernels: (BN, BK, warps, stages, CTAs per SM, warp-specialised); BM is PERSIST_BM (the
# tile table's). Shared memory per stage as above (flattened loops take ~16 KB more)
PERSIST_BM = 64


def _pconfigs(shapes):
    return [triton.Config({"BM": PERSIST_BM, "BN": bn, "BK": bk, "CPS": cps, "WS": ws}, num_warps=w, num_stages=st,
                          pre_hook=_set_blocks) for bn, bk, w, st, cps, ws in shapes]


_UP_PCONFIGS = _pconfigs(((256, 32, 8, 5, 1, False), (128, 64, 4, 5, 1, False), (128, 64, 8, 4, 1, False),
                          (128, 64, 4, 2, 2, False), (256, 64, 8, 2, 1, False), (256, 32, 8, 4, 1, True),
                          (256, 64, 8, 3, 1, True)))
_DOWN_PCONFIGS = _pconfigs(((128, 64, 4, 4, 2, False), (256, 64, 8, 3, 1, False), (128, 64, 8, 5, 1, False),
                            (128, 128, 8, 3, 1, False), (64, 64, 4, 4, 3, False), (128, 64, 4, 4, 2, True)))


@triton.jit(do_not_specialize=["NT"])
def _tiles_kernel(cnt_ptr, tile_ptr, E, NT, BM: tl.constexpr, BE: tl.constexpr, BLK: tl.constexpr):
    """The BM-row tiles of the expert-sorted rows in order: tile_ptr[0] = how many, then per tile
    (expert, first row, end row of that expert) at 1 + 3 p; NT bounds the count."""
    ee = tl.arange(0, BE)
    cnt = tl.load(cnt_ptr + ee, mask=ee < E, other=0).to(tl.int32)
    nt = (cnt + BM - 1) // BM
    tend = tl.cumsum(nt, 0)  # [BE] end tile of each expert
    rend = tl.cumsum(cnt, 0)  # [BE] end row of each expert
    p = tl.program_id(0) * BLK + tl.arange(0, BLK)
    e = tl.sum((tend[None, :] <= p[:, None]).to(tl.int32), 1)  # [BLK]
    sel = ee[None, :] == e[:, None]
    re = tl.sum(tl.where(sel, rend[None, :], 0), 1)
    row0 = re - tl.sum(tl.where(sel, cnt[None, :], 0), 1) + (p - tl.sum(tl.where(sel, (tend - nt)[None, :], 0), 1)) * BM
    m = (p < NT) & (e < E)
    tl.store(tile_ptr + 1 + 3 * p, e, mask=m)
    tl.store(tile_ptr + 2 + 3 * p, row0, mask=m)
    tl.store(tile_ptr + 3 + 3 * p, re, mask=m)
    if tl.program_id(0) == 0:
        tl.store(tile_ptr, tl.sum(nt, 0))


def tile_table(counts: torch.Tensor, M: int, bm: int | None = None) -> torch.Tensor:
    """counts [E] rows per expert (M in all) -> the table of bm-row tiles (_tiles_kernel; default
    PERSIST_BM rows, MIXED_BM for the mixed gate/up)."""
    bm = bm or PERSIST_BM
    E = counts.shape[0]
    NT = triton.cdiv(M, bm) + min(E, M)
    tiles = torch.empty(1 + 3 * NT, dtype=torch.int32, device=counts.device)
    BLK = 32
    _tiles_kernel[(triton.cdiv(NT, BLK),)](counts, tiles, E, NT, BM=bm, BE=pow2(E), BLK=BLK)
    return tiles


@autotune(_UP_PCONFIGS, key=["H", "I", "RB", "GATHER"])
@triton.jit(do_not_specialize=["RB"])
def _gate_up_persistent_kernel(a_desc, b_desc, tile_ptr, h_ptr, x_ptr, src_ptr, H, I, RB,
                               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CPS: tl.constexpr,
                               WS: tl.constexpr, GATHER: tl.constexpr):
    """_gate_up_kernel's product, a grid of CPS programs per SM walking the tile table's (row tile,
    column tile) pairs (CPS only sizes the grid)."""
    NN = tl.cdiv(I, BN)
    total = tl.load(tile_ptr) * NN
    # _gate_up_tile's body written out, kk hoisted (the measured default's code; the call form reorders it)
    kk = tl.arange(0, BK)
    for t in tl.range(tl.program_id(0), total, tl.num_programs(0), flatten=not WS, warp_specialize=WS):
        pm = t // NN
        n0 = (t % NN) * BN
        e = tl.load(tile_ptr + 1 + 3 * pm)
        row0 = tl.load(tile_ptr + 2 + 3 * pm)
        rend = tl.load(tile_ptr + 3 + 3 * pm)
        r = (row0 + tl.arange(0, BM)).to(tl.int64)
        wrow = e * 2 * I + n0
        if GATHER:
            tok = tl.load(src_ptr + r, mask=r < rend, other=0)
        acc_g = tl.zeros([BM, BN], dtype=tl.float32)
        acc_u = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, H, BK):
            if GATHER:
                a = tl.load(x_ptr + tok[:, None] * H + (k0 + kk)[None, :], mask=((k0 + kk) < H)[None, :], other=0.0)
            else:
                a = a_desc.load([row0, k0])
            acc_g = tl.dot(a, b_desc.load([wrow, k0]).T, acc_g)
            acc_u = tl.dot(a, b_desc.load([wrow + I, k0]).T, acc_u)
        dt = h_ptr.dtype.element_ty
        g = acc_g.to(dt).to(tl.float32)
        hv = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * acc_u.to(dt).to(tl.float32)
        n = n0 + tl.arange(0, BN)
        tl.store(h_ptr + r[:, None] * I + n[None, :], hv.to(dt), mask=(r < rend)[:, None] & (n < I)[None, :])


# mixed kernels: the table's tiles are MIXED_BM rows; an expert's last tile with at most half of that
# left runs as a MIXED_BM / 2-row tile (160 rows: 128 + 64, not 64 + 64 + 64 or 128 + 128). Configs:
# (BN, BK, warps, stages, CPS, WS); two fp32 [MIXED_BM, BN] accumulators need 8 warps at BN = 128
MIXED_BM = 128


def _set_b_block(nargs):
    nargs["b_desc"].block_shape = [nargs["BN"], nargs["BK"]]


def _set_mixed_blocks(nargs):
    """The mixed down's two boxes over h (the tile heights) and the weights' box."""
    nargs["a_desc"].block_shape = [nargs["BM"], nargs["BK"]]
    nargs["as_desc"].block_shape = [nargs["BM"] // 2, nargs["BK"]]
    nargs["b_desc"].block_shape = [nargs["BN"], nargs["BK"]]


def _mconfigs(shapes, hook):
    return [triton.Config({"BM": MIXED_BM, "BN": bn, "BK": bk, "CPS": cps, "WS": ws}, num_warps=w, num_stages=st,
                          pre_hook=hook) for bn, bk, w, st, cps, ws in shapes]


_UP_MCONFIGS = _mconfigs(((128, 64, 8, 3, 1, False), (128, 64, 8, 4, 1, False), (128, 64, 8, 3, 1, True),
                          (128, 32, 8, 5, 1, False), (64, 64, 4, 3, 2, False), (64, 64, 8, 4, 1, False)), _set_b_block)
# down: one accumulator, so 128 x 256 fits 8 warps
_DOWN_MCONFIGS = _mconfigs(((256, 64, 8, 3, 1, False), (128, 64, 8, 4, 1, False), (128, 128, 8, 3, 1, False),
                            (128, 64, 4, 3, 2, False), (256, 64, 8, 3, 1, True)), _set_mixed_blocks)


@autotune(_UP_MCONFIGS, key=["H", "I", "RB"])
@triton.jit(do_not_specialize=["RB"])
def _gate_up_mixed_kernel(b_desc, tile_ptr, h_ptr, x_ptr, src_ptr, H, I, RB, BM: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr, CPS: tl.constexpr, WS: tl.constexpr):
    """_gate_up_persistent_kernel's walk (x [T, H] gathered by pointers, so no A descriptor) over a
    table of BM-row tiles, each in one of two shapes: [BM // 2, BN] when its expert has at most
    BM // 2 rows left from the tile's first row, [BM, BN] otherwise."""
    NN = tl.cdiv(I, BN)
    total = tl.load(tile_ptr) * NN
    for t in tl.range(tl.program_id(0), total, tl.num_programs(0), warp_specialize=WS):
        pm = t // NN
        n0 = (t % NN) * BN
        e = tl.load(tile_ptr + 1 + 3 * pm)
        row0 = tl.load(tile_ptr + 2 + 3 * pm)
        rend = tl.load(tile_ptr + 3 + 3 * pm)
        # (x_ptr stands in for the A descriptor: with GATHER the tile never reads it)
        if rend - row0 <= BM // 2:
            _gate_up_tile(x_ptr, b_desc, h_ptr, x_ptr, src_ptr, e, row0, rend, n0, H, I, BM // 2, BN, BK, True)
        else:
            _gate_up_tile(x_ptr, b_desc, h_ptr, x_ptr, src_ptr, e, row0, rend, n0, H, I, BM, BN, BK, True)


@autotune(_DOWN_PCONFIGS, key=["H", "I", "RB"])
@triton.jit(do_not_specialize=["RB"])
def _down_persistent_kernel(a_desc, b_desc, tile_ptr, y_ptr, H, I, RB, BM: tl.constexpr, BN: tl.constexpr,
                            BK: tl.constexpr, CPS: tl.constexpr, WS: tl.constexpr):
    """_down_kernel's product over the tile table (as _gate_up_persistent_kernel)."""
    NN = tl.cdiv(H, BN)
    total = tl.load(tile_ptr) * NN
    for t in tl.range(tl.program_id(0), total, tl.num_programs(0), flatten=not WS, warp_specialize=WS):
        pm = t // NN
        n0 = (t % NN) * BN
        e = tl.load(tile_ptr + 1 + 3 * pm)
        row0 = tl.load(tile_ptr + 2 + 3 * pm)
        rend = tl.load(tile_ptr + 3 + 3 * pm)
        _down_tile(a_desc, b_desc, y_ptr, e, row0, rend, n0, H, I, BM, BN, BK)


@autotune(_DOWN_MCONFIGS, key=["H", "I", "RB"])
@triton.jit(do_not_specialize=["RB"])
def _down_mixed_kernel(a_desc, as_desc, b_desc, tile_ptr, y_ptr, H, I, RB, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, CPS: tl.constexpr, WS: tl.constexpr):
    """_down_persistent_kernel's product over _gate_up_mixed_kernel's table and tile shapes: a_desc
    and as_desc are h with BM- and BM // 2-row boxes."""
    NN = tl.cdiv(H, BN)
    total = tl.load(tile_ptr) * NN
    for t in tl.range(tl.program_id(0), total, tl.num_programs(0), warp_specialize=WS):
        pm = t // NN
        n0 = (t % NN) * BN
        e = tl.load(tile_ptr + 1 + 3 * pm)
        row0 = tl.load(tile_ptr + 2 + 3 * pm)
        rend = tl.load(tile_ptr + 3 + 3 * pm)
        if rend - row0 <= BM // 2:
            _down_tile(as_desc, b_desc, y_ptr, e, row0, rend, n0, H, I, BM // 2, BN, BK)
        else:
            _down_tile(a_desc, b_desc, y_ptr, e, row0, rend, n0, H, I, BM, BN, BK)


def _pgrid(device, NT: int, N: int):
    """CPS programs per SM, never more than the (row, column) tiles there can be."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return lambda meta: (min(sms * meta["CPS"], NT * triton.cdiv(N, meta["BN"])),)


def _rows_class(M: int, E: int) -> int:
    """Autotuning key: mean rows per expert rounded up to a power of two (tiles are timed once per
    class; a prefill of 8K tokens at top-10 of 512 is class 256, one of 512 tokens class 16)."""
    return pow2(max(1, M // E), 1)


def _grid(M: int, E: int, N: int):
    return lambda meta: ((triton.cdiv(M, meta["BM"]) + min(E, M)) * triton.cdiv(N, meta["BN"]),)


def gate_up(xs: torch.Tensor, gate_up_proj: torch.Tensor, counts: torch.Tensor,
            src: torch.Tensor | None = None, tiles: torch.Tensor | None = None, mixed: bool = False) -> torch.Tensor:
    """xs [M, H] expert-sorted rows (or, with src [M], x [T, H] and each sorted row's token),
    gate_up_proj [E, 2I, H], counts [E] rows per expert -> h [M, I]. With `tiles` (tile_table of
    these counts) the persistent kernel runs; with `mixed` too (tiles of MIXED_BM rows, src given)
    the mixed-tile one."""
    M, H = xs.shape if src is None else (src.shape[0], xs.shape[1])
    E, I2, _ = gate_up_proj.shape
    I = I2 // 2
    h = torch.empty(M, I, dtype=xs.dtype, device=xs.device)
    dummy = [1, 1]  # boxes set by the pre-hook
    b = TensorDescriptor(gate_up_proj, [E * I2, H], [H, 1], dummy)
    if mixed:
        if tiles is None or src is None:
            raise ValueError("gate_up(mixed=True) needs tiles (tile_table(counts, M, MIXED_BM)) and src")
        _gate_up_mixed_kernel[_pgrid(xs.device, (tiles.shape[0] - 1) // 3, I)](
            b, tiles, h, xs, src, H, I, _rows_class(M, E))
        return h
    a = TensorDescriptor(xs, list(xs.shape), [H, 1], dummy)
    if tiles is not None:
        _gate_up_persistent_kernel[_pgrid(xs.device, (tiles.shape[0] - 1) // 3, I)](
            a, b, tiles, h, xs, tiles if src is None else src, H, I, _rows_class(M, E), GATHER=src is not None)
        return h
    _gate_up_kernel[_grid(M, E, I)](a, b, counts, h, xs, counts if src is None else src, E, H, I, _rows_class(M, E),
                                    BE=pow2(E), GATHER=src is not None)
    return h


def down(h: torch.Tensor, down_proj: torch.Tensor, counts: torch.Tensor,
         tiles: torch.Tensor | None = None, mixed: bool = False) -> torch.Tensor:
    """h [M, I] expert-sorted rows, down_proj [E, H, I] -> y [M, H] (persistent with `tiles`; the
    mixed-tile kernel with `mixed` too, tiles then of MIXED_BM rows)."""
    M, I = h.shape
    E, H, _ = down_proj.shape
    y = torch.empty(M, H, dtype=h.dtype, device=h.device)
    dummy = [1, 1]
    a = TensorDescriptor(h, [M, I], [I, 1], dummy)
    b = TensorDescriptor(down_proj, [E * H, I], [I, 1], dummy)
    if mixed:
        if tiles is None:
            raise ValueError("down(mixed=True) needs tiles (tile_table(counts, M, MIXED_BM))")
        a_small = TensorDescriptor(h, [M, I], [I, 1], dummy)
        _down_mixed_kernel[_pgrid(h.device, (tiles.shape[0] - 1) // 3, H)](a, a_small, b, tiles, y, H, I,
                                                                           _rows_class(M, E))
        return y
    if tiles is not None:
        _down_persistent_kernel[_pgrid(h.device, (tiles.shape[0] - 1) // 3, H)](a, b, tiles, y, H, I,
                                                                                 _rows_class(M, E))
        return y
    _down_kernel[_grid(M, E, H)](a, b, counts, y, E, H, I, _rows_class(M, E), BE=pow2(E))
    return y
