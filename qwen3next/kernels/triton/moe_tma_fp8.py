"""Prefill-sized routed experts over block-FP8 weights, w8a8, over expert-sorted rows: the fp8
counterpart of moe_grouped.py's "triton_gather" path (moe_tma.py's kernels), for moe_fp8.py.

x is quantised once per token and 128-channel group (moe_fp8.quantize_act); moe_grouped.sort_rows
gives each (token, choice) row its place in the expert-sorted order (no padding, no host sync).
Gate/up reads x's fp8 rows in place through the sort's token map, the weight tiles through TMA
boxes, and per 128-wide k step adds the fp8 tensor-core product times act_scale[row, k block] x
w_scale[n block, k block]; its epilogue forms silu(gate) * up (rounded as the reference rounds) and
quantises it per row and 128 columns for the down GEMM, which reads h and the weights through TMA
the same way. moe_grouped's unsort-sum weights and sums each token's k rows. No shared expert: the
MoE block keeps its three Fp8Linear calls at prefill sizes (layers/quant.py FUSED_SHARED_MAX_ROWS).
PERSISTENT (env QWEN3NEXT_FP8_PERSISTENT: "down", "all" or "" for none): those GEMMs as persistent
kernels walking moe_tma's tile table (a few programs per SM, tiles in expert order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ...env_switches import switch
from . import moe_tma
from ._util import autotune, pow2
from .moe_fp8 import _TL_DTYPE, FP8_MAX, quantize_act
from .moe_grouped import sort_rows, unsort_sum
from .moe_tma import _grid, _pgrid, _rows_class, _tile

GROUP = 128  # activation groups and weight scale blocks (the kernels step K in these)


def _set_up_blocks(nargs):
    """Autotune pre-hook: the weight descriptor's box follows the config's tile."""
    nargs["b_desc"].block_shape = [nargs["BN"], nargs["BK"]]


def _set_down_blocks(nargs):
    nargs["a_desc"].block_shape = [nargs["BM"], nargs["BK"]]
    nargs["b_desc"].block_shape = [nargs["BN"], nargs["BK"]]


# (BM, BN, BK, warps, stages); the first is the interpreter's and QWEN3NEXT_AUTOTUNE=0's. BK divides
# 128 (one scale per k step); gate/up has BN = 128 (one activation group of h per program) and
# holds two fp32 accumulators plus the two products: ptxas (triton 3.6, sm_90a) fits BM = 64 over 8
# warps in 128 registers (two CTAs per SM where shared memory allows: 2 stages), BM = 128 in ~250;
# 64 rows per warpgroup over 4 warps spilled. Shared memory per stage BK * (BM + 2 BN) bytes
# (gate/up), BK * (BM + BN) (down), at most 227 KB over the stages. Down's BM = 128 x BN = 256
# spilled (1 KB): left out.
_UP_CONFIGS = [triton.Config({"BM": bm, "BN": 128, "BK": bk}, num_warps=w, num_stages=st, pre_hook=_set_up_blocks)
               for bm, bk, w, st in ((64, 128, 8, 3), (64, 128, 8, 4), (64, 64, 8, 5), (128, 128, 8, 3),
                                     (64, 128, 8, 5), (64, 128, 8, 2), (128, 64, 8, 4))]
_DOWN_CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st,
                               pre_hook=_set_down_blocks)
                 for bm, bn, bk, w, st in ((128, 128, 128, 8, 3), (64, 128, 128, 4, 4), (64, 256, 128, 8, 3),
                                           (128, 128, 128, 8, 4), (128, 64, 128, 4, 4), (64, 128, 128, 8, 4))]


# persistent kernels: BM = moe_tma.PERSIST_BM (the tile table's); (BK, warps, stages, CTAs per SM) for gate/up
# (BN = 128), (BN, BK, warps, stages, CTAs per SM) for down; CTAs per SM as registers (ptxas: 194-254 a
# thread) and shared memory allow
_UP_PCONFIGS = [triton.Config({"BM": moe_tma.PERSIST_BM, "BN": 128, "BK": bk, "CPS": cps, "WS": ws}, num_warps=w,
                              num_stages=st,
                              pre_hook=_set_up_blocks)
                for bk, w, st, cps, ws in ((128, 8, 3, 1, False), (64, 8, 5, 1, False), (128, 8, 4, 1, False),
                                           (128, 8, 2, 1, False), (128, 8, 3, 1, True), (128, 8, 4, 1, True))]
_DOWN_PCONFIGS = [triton.Config({"BM": moe_tma.PERSIST_BM, "BN": bn, "BK": bk, "CPS": cps}, num_warps=w,
                                num_stages=st, pre_hook=_set_down_blocks)
                  for bn, bk, w, st, cps in ((128, 128, 4, 4, 2), (128, 128, 8, 3, 1), (256, 128, 8, 3, 1),
                                             (128, 128, 8, 4, 1), (64, 128, 4, 4, 2))]
# H200, session 5, one layer at 81920 rows: down 0.42 vs 0.47 ms persistent; gate/up 0.80-0.92 vs 0.78 (flattened)
PERSISTENT = switch("QWEN3NEXT_FP8_PERSISTENT")


@autotune(_UP_CONFIGS, key=["H", "I", "RB"])
@triton.jit(do_not_specialize=["RB"])
def _gate_up_kernel(b_desc, cnt_ptr, src_ptr, x_ptr, xs_ptr, s_ptr, h_ptr, hs_ptr, E, H, I, RB,
                    DT: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """x [T, H] fp8 + scales xs [T, H/128]; b_desc: gate_up [E*2I, H] fp8 + scales s [E, 2I/128,
    H/128] -> h [M, I] fp8 + scales hs [M, I/128] of silu(x W_gate^T) * (x W_up^T), sorted row r
    being token src[r]'s row."""
    NN = tl.cdiv(I, BN)
    pm = tl.program_id(0) // NN
    n0 = (tl.program_id(0) % NN) * BN
    e, row0, rend = _tile(cnt_ptr, pm, E, BM, BE)
    if e < E:
        SK = H // 128
        r = (row0 + tl.arange(0, BM)).to(tl.int64)
        rm = r < rend
        tok = tl.load(src_ptr + r, mask=rm, other=0)  # rows past the expert's end: token 0, never stored
        n = n0 + tl.arange(0, BN)
        wrow = e * 2 * I + n0
        # BN = 128 inside one scale block: one weight scale per k step (a scalar, not a [BN] vector)
        sg_ptr = s_ptr + (e * (2 * I // 128) + n0 // 128) * SK
        su_ptr = sg_ptr + (I // 128) * SK
        kk = tl.arange(0, BK)
        acc_g = tl.zeros([BM, BN], dtype=tl.float32)
        acc_u = tl.zeros([BM, BN], dtype=tl.float32)
        xsc = tl.load(xs_ptr + tok * SK)  # [BM] this k step's scales (k block 0)
        sg = tl.load(sg_ptr)
        su = tl.load(su_ptr)
        for k0 in range(0, H, BK):
            # the next step's scales loaded one step ahead (Triton pipelines only the dot operands:
            # loaded here they would stall each step on their latency)
            kn = tl.minimum((k0 + BK) // 128, SK - 1)
            xsc_n = tl.load(xs_ptr + tok * SK + kn)
            sg_n = tl.load(sg_ptr + kn)
            su_n = tl.load(su_ptr + kn)
            a = tl.load(x_ptr + tok[:, None] * H + (k0 + kk)[None, :])  # [BM, BK] fp8
            # fp8 x fp8 on the tensor cores, the fp32 product scaled per 128-wide k block
            acc_g += tl.dot(a, b_desc.load([wrow, k0]).T) * (xsc[:, None] * sg)
            acc_u += tl.dot(a, b_desc.load([wrow + I, k0]).T) * (xsc[:, None] * su)
            xsc, sg, su = xsc_n, sg_n, su_n
        # round like the reference (products in the activation dtype, then the gate, then the product)
        gt = acc_g.to(DT).to(tl.float32)
        hv = ((gt / (1.0 + tl.exp(-gt))).to(DT).to(tl.float32) * acc_u.to(DT).to(tl.float32)).to(DT).to(tl.float32)
        # BN = 128: this program's columns are one activation group of each row; IEEE divisions
        # (div_rn; `/` is the ~2-ulp approximate one on GPUs): kernels/fp8.quantize_act's bits
        amax = tl.max(tl.abs(hv), 1)
        sc = tl.where(amax > 0, tl.math.div_rn(amax, FP8_MAX), 1.0)
        q = tl.minimum(tl.maximum(tl.math.div_rn(hv, sc[:, None]), -FP8_MAX), FP8_MAX)
        tl.store(h_ptr + r[:, None] * I + n[None, :], q.to(h_ptr.dtype.element_ty), mask=rm[:, None])
        tl.store(hs_ptr + r * (I // 128) + n0 // 128, sc, mask=rm)


@autotune(_DOWN_CONFIGS, key=["H", "I", "RB"])
@triton.jit(do_not_specialize=["RB"])
def _down_kernel(a_desc, b_desc, cnt_ptr, hs_ptr, s_ptr, y_ptr, E, H, I, RB,
                 BE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """a_desc: h [M, I] fp8 + scales hs [M, I/128]; b_desc: down [E*H, I] fp8 + scales s [E, H/128,
    I/128] -> y [M, H] = h W_down^T (expert-sorted rows, y's dtype)."""
    NN = tl.cdiv(H, BN)
    pm = tl.program_id(0) // NN
    n0 = (tl.program_id(0) % NN) * BN
    e, row0, rend = _tile(cnt_ptr, pm, E, BM, BE)
    if e < E:
        SK = I // 128
        r = (row0 + tl.arange(0, BM)).to(tl.int64)
        rm = r < rend
        n = n0 + tl.arange(0, BN)
        nm = n < H
        if BN <= 128:  # one scale block: a scalar weight scale (H % 128 == 0 keeps it in range)
            sd_ptr = s_ptr + (e * (H // 128) + n0 // 128) * SK
            sd_mask = True
        else:  # [BN]: the columns' scale blocks
            sd_ptr = s_ptr + (e * (H // 128) + n // 128) * SK
            sd_mask = nm
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        hsc = tl.load(hs_ptr + r * SK, mask=rm, other=0.0)  # [BM] (k block 0)
        sd = tl.load(sd_ptr, mask=sd_mask, other=0.0)
        for k0 in range(0, I, BK):
            kn = tl.minimum((k0 + BK) // 128, SK - 1)  # the next step's scales, one step ahead
            hsc_n = tl.load(hs_ptr + r * SK + kn, mask=rm, other=0.0)
            sd_n = tl.load(sd_ptr + kn, mask=sd_mask, other=0.0)
            if BN <= 128:
                scale = hsc[:, None] * sd
            else:
                scale = hsc[:, None] * sd[None, :]
            acc += tl.dot(a_desc.load([row0, k0]), b_desc.load([e * H + n0, k0]).T) * scale
            hsc, sd = hsc_n, sd_n
        tl.store(y_ptr + r[:, None] * H + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=rm[:, None] & nm[None, :])


@autotune(_UP_PCONFIGS, key=["H", "I", "RB"])
@triton.jit(do_not_specialize=["RB"])
def _gate_up_persistent_kernel(b_desc, tile_ptr, src_ptr, x_ptr, xs_ptr, s_ptr, h_ptr, hs_ptr, H, I, RB,
                               DT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                               CPS: tl.constexpr, WS: tl.constexpr):
    """_gate_up_kernel's product, a grid of CPS programs per SM walking the tile table's (row tile,
    column tile) pairs (CPS only sizes the grid)."""
    NN = tl.cdiv(I, BN)
    SK = H // 128
    total = tl.load(tile_ptr) * NN
    kk = tl.arange(0, BK)
    for t in tl.range(tl.program_id(0), total, tl.num_programs(0), flatten=not WS, warp_specialize=WS):
        pm = t // NN
        n0 = (t % NN) * BN
        e = tl.load(tile_ptr + 1 + 3 * pm)
        row0 = tl.load(tile_ptr + 2 + 3 * pm)
        rend = tl.load(tile_ptr + 3 + 3 * pm)
        r = (row0 + tl.arange(0, BM)).to(tl.int64)
        rm = r < rend
        tok = tl.load(src_ptr + r, mask=rm, other=0)
        wrow = e * 2 * I + n0
        sg_ptr = s_ptr + (e * (2 * I // 128) + n0 // 128) * SK
        su_ptr = sg_ptr + (I // 128) * SK
        acc_g = tl.zeros([BM, BN], dtype=tl.float32)
        acc_u = tl.zeros([BM, BN], dtype=tl.float32)
        xsc = tl.load(xs_ptr + tok * SK)
        sg = tl.load(sg_ptr)
        su = tl.load(su_ptr)
        for k0 in range(0, H, BK):
            kn = tl.minimum((k0 + BK) // 128, SK - 1)  # the next step's scales, one step ahead
            xsc_n = tl.load(xs_ptr + tok * SK + kn)
            sg_n = tl.load(sg_ptr + kn)
            su_n = tl.load(su_ptr + kn)
            a = tl.load(x_ptr + tok[:, None] * H + (k0 + kk)[None, :])
            acc_g += tl.dot(a, b_desc.load([wrow, k0]).T) * (xsc[:, None] * sg)
            acc_u += tl.dot(a, b_desc.load([wrow + I, k0]).T) * (xsc[:, None] * su)
            xsc, sg, su = xsc_n, sg_n, su_n
        gt = acc_g.to(DT).to(tl.float32)
        hv = ((gt / (1.0 + tl.exp(-gt))).to(DT).to(tl.float32) * acc_u.to(DT).to(tl.float32)).to(DT).to(tl.float32)
        amax = tl.max(tl.abs(hv), 1)
        sc = tl.where(amax > 0, tl.math.div_rn(amax, FP8_MAX), 1.0)
        q = tl.minimum(tl.maximum(tl.math.div_rn(hv, sc[:, None]), -FP8_MAX), FP8_MAX)
        n = n0 + tl.arange(0, BN)
        tl.store(h_ptr + r[:, None] * I + n[None, :], q.to(h_ptr.dtype.element_ty), mask=rm[:, None])
        tl.store(hs_ptr + r * (I // 128) + n0 // 128, sc, mask=rm)


@autotune(_DOWN_PCONFIGS, key=["H", "I", "RB"])
@triton.jit(do_not_specialize=["RB"])
def _down_persistent_kernel(a_desc, b_desc, tile_ptr, hs_ptr, s_ptr, y_ptr, H, I, RB, BM: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr, CPS: tl.constexpr):
    """_down_kernel's product over the tile table (as _gate_up_persistent_kernel)."""
    NN = tl.cdiv(H, BN)
    SK = I // 128
    total = tl.load(tile_ptr) * NN
    for t in tl.range(tl.program_id(0), total, tl.num_programs(0), flatten=True):
        pm = t // NN
        n0 = (t % NN) * BN
        e = tl.load(tile_ptr + 1 + 3 * pm)
        row0 = tl.load(tile_ptr + 2 + 3 * pm)
        rend = tl.load(tile_ptr + 3 + 3 * pm)
        r = (row0 + tl.arange(0, BM)).to(tl.int64)
        rm = r < rend
        n = n0 + tl.arange(0, BN)
        nm = n < H
        # [BN]: the columns' scale blocks (one block when BN <= 128; a vector keeps one code path)
        sd_ptr = s_ptr + (e * (H // 128) + n // 128) * SK
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        hsc = tl.load(hs_ptr + r * SK, mask=rm, other=0.0)
        sd = tl.load(sd_ptr, mask=nm, other=0.0)
        for k0 in range(0, I, BK):
            kn = tl.minimum((k0 + BK) // 128, SK - 1)
            hsc_n = tl.load(hs_ptr + r * SK + kn, mask=rm, other=0.0)
            sd_n = tl.load(sd_ptr + kn, mask=nm, other=0.0)
            acc += tl.dot(a_desc.load([row0, k0]), b_desc.load([e * H + n0, k0]).T) * (hsc[:, None] * sd[None, :])
            hsc, sd = hsc_n, sd_n
        tl.store(y_ptr + r[:, None] * H + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=rm[:, None] & nm[None, :])


# H200, 80B expert shapes, one layer (session 4): 1.34 vs 1.62 ms for the padded w8a8 GEMM at 81920
# routed rows (8192 tokens), but 1.06 vs 0.85 ms at 20480 rows: taken only where it was measured to win
MIN_ROWS = 65536


def suits(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, block, rows: int) -> bool:
    """Whether this path takes the call: fp8 experts in 128x128 blocks, bf16 CUDA activations (the
    GPU-tested case) on sm90 (TMA; the chip it was written for), H and I multiples of 128, at least
    MIN_ROWS routed rows (long prefills)."""
    H, I = x.shape[1], down_proj.shape[-1]
    return (x.is_cuda and x.dtype == torch.bfloat16 and tuple(block) == (GROUP, GROUP)
            and gate_up_proj.dtype == down_proj.dtype == torch.float8_e4m3fn and rows >= MIN_ROWS
            and H % GROUP == 0 and I % GROUP == 0 and torch.cuda.get_device_capability(x.device)[0] == 9)


def gate_up(xq: torch.Tensor, xs: torch.Tensor, gate_up_proj: torch.Tensor, gate_up_scale: torch.Tensor,
            counts: torch.Tensor, src: torch.Tensor, dtype: torch.dtype,
            tiles: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """xq [T, H] fp8 + xs [T, H/128], gate_up_proj [E, 2I, H] fp8 + scale [E, 2I/128, H/128], counts
    [E], src [M] each sorted row's token -> (h [M, I] fp8, hs [M, I/128] fp32); `dtype`: the
    activation dtype the reference rounds its products to; with `tiles` (moe_tma.tile_table) the
    persistent kernel."""
    M, H = src.shape[0], xq.shape[1]
    E, I2, _ = gate_up_proj.shape
    I = I2 // 2
    h = torch.empty(M, I, dtype=torch.float8_e4m3fn, device=xq.device)
    hs = torch.empty(M, I // GROUP, dtype=torch.float32, device=xq.device)
    b = TensorDescriptor(gate_up_proj, [E * I2, H], [H, 1], [1, 1])  # box set by the pre-hook
    if tiles is not None:
        _gate_up_persistent_kernel[_pgrid(xq.device, (tiles.shape[0] - 1) // 3, I)](
            b, tiles, src, xq, xs, gate_up_scale, h, hs, H, I, _rows_class(M, E), DT=_TL_DTYPE[dtype])
        return h, hs
    _gate_up_kernel[_grid(M, E, I)](b, counts, src, xq, xs, gate_up_scale, h, hs, E, H, I, _rows_class(M, E),
                                    DT=_TL_DTYPE[dtype], BE=pow2(E))
    return h, hs


def down(h: torch.Tensor, hs: torch.Tensor, down_proj: torch.Tensor, down_scale: torch.Tensor,
         counts: torch.Tensor, dtype: torch.dtype, tiles: torch.Tensor | None = None) -> torch.Tensor:
    """h [M, I] fp8 + hs [M, I/128], down_proj [E, H, I] fp8 + scale [E, H/128, I/128] -> y [M, H]
    (persistent with `tiles`)."""
    M, I = h.shape
    E, H, _ = down_proj.shape
    y = torch.empty(M, H, dtype=dtype, device=h.device)
    a = TensorDescriptor(h, [M, I], [I, 1], [1, 1])
    b = TensorDescriptor(down_proj, [E * H, I], [I, 1], [1, 1])
    if tiles is not None:
        _down_persistent_kernel[_pgrid(h.device, (tiles.shape[0] - 1) // 3, H)](a, b, tiles, hs, down_scale, y, H, I,
                                                                                 _rows_class(M, E))
        return y
    _down_kernel[_grid(M, E, H)](a, b, counts, hs, down_scale, y, E, H, I, _rows_class(M, E), BE=pow2(E))
    return y


def moe_experts_sorted_fp8(x, gate_up_proj, gate_up_scale, down_proj, down_scale, weights, ids, *,
                           persistent: str | None = None, gated=None) -> torch.Tensor:
    """x [T, H]; gate_up_proj [E, 2I, H] fp8 + scale [E, 2I/128, H/128]; down_proj [E, H, I] fp8 +
    scale [E, H/128, I/128]; weights/ids [T, k] -> [T, H] in x's dtype: kernels/fp8.py's
    moe_experts_fp8 with act_quant=True. `persistent`: which GEMMs run persistent ("down", "all", "";
    default PERSISTENT);
    `gated` = (sh [T, H], g [T, 1]): + sigmoid(g) * sh in the k-sum's pass (moe_grouped.unsort_sum)."""
    T, H = x.shape
    E, k = gate_up_proj.shape[0], ids.shape[1]
    I = down_proj.shape[-1]
    if H % GROUP or I % GROUP:
        raise ValueError(f"sorted fp8 experts need hidden_size ({H}) and moe_intermediate_size ({I}) % 128 == 0")
    x = x.contiguous()
    _, counts, _, pos, src = sort_rows(x, ids, E, copy=False)
    persistent = PERSISTENT if persistent is None else persistent
    if persistent not in ("", "down", "all"):
        raise ValueError(f"persistent must be '', 'down' or 'all', not {persistent!r}")
    tiles = moe_tma.tile_table(counts, T * k) if persistent else None
    xq, xs = quantize_act(x, GROUP)  # [T, H] fp8, [T, H/128]
    h, hs = gate_up(xq, xs, gate_up_proj.contiguous(), gate_up_scale.contiguous(), counts, src, x.dtype,
                    tiles if persistent == "all" else None)
    y = down(h, hs, down_proj.contiguous(), down_scale.contiguous(), counts, x.dtype, tiles)  # [T*k, H]
    return unsort_sum(y, pos, weights, T, gated)
