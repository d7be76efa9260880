"""Prefill-sized routed experts over expert-sorted rows (no padding to a block size, no host sync).

Count each expert's rows (atomics) and give every (token, choice) row its place in the
expert-sorted order (one launch); gate/up and down as grouped GEMMs over the sorted rows against
the stacked [E, 2I, H] / [E, H, I] weights (no weight copy); then each token's k rows gathered
back, scaled by their routing weights and summed in fp32. Rounding follows kernels/moe.py
(products in the activation dtype). The GEMMs (`gemm`):
* "triton_gather" (default): moe_tma.py's kernels, gate/up reading x's rows in place through the
  sort's token map, silu(gate) * up in its epilogue, the weights through TMA boxes;
* "triton": the same on a sorted copy of x's rows (the A tiles through TMA too);
* "torch": torch._grouped_mm (CUTLASS on sm90) on the sorted copy, the [E, 2I, H] weights read
  as a transposed view, silu * up in one small launch between the two GEMMs;
* "gather_torch": triton_gather's gate/up, torch's down (each the faster one in its GEMM on the
  H200 at 8K tokens; the pair not yet timed together);
* "persistent": triton_gather's GEMMs as moe_tma's persistent kernels (a grid of a few programs
  per SM walking a table of tiles in expert order);
* "persistent_mixed" (opt-in, not yet timed on a GPU): persistent, but the GEMMs walk a table of
  128-row tiles, an expert's last tile 64 rows high when at most 64 rows are left (moe_tma.MIXED_BM;
  down too unless MIXED_DOWN is off);
* "resident" (auto's choice from PERSISTENT_MIN_ROWS): the persistent gate/up, then moe_resident.py's
  expert-resident down (one program per (expert's <= 192 rows, column tile), each weight tile loaded
  once for all of them; its gate/up too with RESIDENT_UP).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...env_switches import switch
from . import moe_resident, moe_tma
from .moe import _count_kernel

# routed rows (T * k) from which the expert-sorted path is used on CUDA, and its GEMMs. Measured on
# the H200 (docs/benchmarks.md, "Session 4: prefill experts over expert-sorted rows"): triton_gather
# beats the padded grouped GEMM of moe.py at T = 1024 (10240 rows) to 8192, by 8-20%; at T = 512
# (5120 rows) the padded one was ahead of "triton" (0.822 vs 0.845 ms). "torch" was 3% ahead of
# triton_gather at T = 8192 alone and behind the padded GEMM below T = 4096.
SORTED_MIN_ROWS = 8192
# "auto": "resident" from PERSISTENT_MIN_ROWS routed rows, "triton_gather" below (H200: session 5, the
# persistent GEMMs 1.56 vs 1.69 ms a layer at 81920 rows, even at 20480; session 6, the resident down
# 0.474 vs 0.545 ms at 81920 rows, 0.415 vs 0.476 at 66560, bitwise equal, 8K prefill graph replay
# 26.0 vs 26.5-26.8 ms); or one of GEMMS, or "off"; QWEN3NEXT_MOE_SORTED overrides
SORTED_GEMM = "auto"
PERSISTENT_MIN_ROWS = 65536
GEMMS = ("torch", "triton", "triton_gather", "gather_torch", "persistent", "persistent_mixed", "resident")
# "persistent_mixed": its down GEMM over the mixed tiles too (False: the 64-row persistent down; an A/B knob)
MIXED_DOWN = True
# "resident": its gate/up GEMM expert-resident too (H200, session 6: 1.01 vs the persistent 0.89 ms at
# T = 8192, so off: the persistent gate/up, the resident down at 0.47 vs 0.54 ms)
RESIDENT_UP = False
# the MoE block's gated shared expert added in the k-sum's pass (unsort_sum); QWEN3NEXT_MOE_FOLD=0: torch ops after
FOLD_GATED = switch("QWEN3NEXT_MOE_FOLD") == "1"


def sorted_gemm(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, rows: int) -> str | None:
    """Which GEMMs the expert-sorted path should use for this call, None when it does not suit:
    bf16 CUDA tensors on sm90 (the only chips it was measured on; elsewhere torch's grouped_mm
    falls back to a host-synced loop, and TMA needs Hopper or later), 16-byte-aligned rows, at
    least SORTED_MIN_ROWS routed rows."""
    gemm = switch("QWEN3NEXT_MOE_SORTED") if "QWEN3NEXT_MOE_SORTED" in os.environ else SORTED_GEMM
    if gemm == "auto":
        gemm = "resident" if rows >= PERSISTENT_MIN_ROWS else "triton_gather"
    if gemm not in GEMMS or (
            gemm in ("torch", "gather_torch") and not hasattr(torch, "_grouped_mm")):
        return None
    if not (x.is_cuda and x.dtype == gate_up_proj.dtype == down_proj.dtype == torch.bfloat16):
        return None
    H, I = x.shape[1], down_proj.shape[-1]
    ok = (rows >= SORTED_MIN_ROWS and H % 8 == 0 and I % 8 == 0
          and torch.cuda.get_device_capability(x.device)[0] == 9)
    return gemm if ok else None


@triton.jit(do_not_specialize=["M"])
def _sort_rows_kernel(ids_ptr, rank_ptr, end_ptr, cnt_ptr, x_ptr, xs_ptr, pos_ptr, src_ptr, M, H,
                      TOPK: tl.constexpr, BA: tl.constexpr, BH: tl.constexpr, COPY: tl.constexpr):
    """Assignment a (token a // TOPK) -> sorted row pos[a] = first row of its expert + its rank,
    src[pos[a]] = the token; with COPY x's row copied there."""
    a = tl.program_id(0) * BA + tl.arange(0, BA)
    m = a < M
    e = tl.load(ids_ptr + a, mask=m, other=0)
    p = (tl.load(end_ptr + e, mask=m, other=0) - tl.load(cnt_ptr + e, mask=m, other=0)
         + tl.load(rank_ptr + a, mask=m, other=0)).to(tl.int64)
    tl.store(pos_ptr + a, p, mask=m)
    tok = (a // TOPK).to(tl.int64)
    tl.store(src_ptr + p, tok, mask=m)
    if COPY:
        for h0 in range(0, H, BH):
            c = h0 + tl.arange(0, BH)
            cm = m[:, None] & (c < H)[None, :]
            v = tl.load(x_ptr + tok[:, None] * H + c[None, :], mask=cm)
            tl.store(xs_ptr + p[:, None] * H + c[None, :], v, mask=cm)


@triton.jit(do_not_specialize=["M"])
def _silu_mul_kernel(gu_ptr, h_ptr, M, I, S, BR: tl.constexpr, BI: tl.constexpr):
    """h [M, I] = silu(gu[:, :I]) * gu[:, I:] (gu row stride S), rounded like the reference."""
    r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    c = tl.program_id(1) * BI + tl.arange(0, BI)
    msk = (r < M)[:, None] & (c < I)[None, :]
    g = tl.load(gu_ptr + r[:, None] * S + c[None, :], mask=msk, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + r[:, None] * S + I + c[None, :], mask=msk, other=0.0).to(tl.float32)
    dt = h_ptr.dtype.element_ty
    hv = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u
    tl.store(h_ptr + r[:, None] * I + c[None, :], hv.to(dt), mask=msk)


@triton.jit(do_not_specialize=["T"])
def _unsort_sum_kernel(y_ptr, pos_ptr, w_ptr, o_ptr, sh_ptr, s_ptr, T, H, YS, TOPK: tl.constexpr, BH: tl.constexpr,
                       GATED: tl.constexpr):
    """out[t] = sum over j of y[pos[t, j]] * w[t, j] (each product in y's dtype, the sum in fp32,
    j in order); GATED: + s[t] * sh[t] (s = sigmoid(the shared expert's gate logit), the MoE block's
    shared expert), rounded as the block's torch ops round (the product, then the sum, in out's dtype)."""
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BH + tl.arange(0, BH)
    cm = c < H
    dt = o_ptr.dtype.element_ty
    acc = tl.zeros([BH], dtype=tl.float32)
    for j in range(TOPK):
        p = tl.load(pos_ptr + t * TOPK + j)
        wj = tl.load(w_ptr + t * TOPK + j).to(dt).to(tl.float32)
        yv = tl.load(y_ptr + p * YS + c, mask=cm, other=0.0).to(tl.float32)
        acc += (yv * wj).to(dt).to(tl.float32)
    if GATED:
        s = tl.load(s_ptr + t).to(tl.float32)
        sh = tl.load(sh_ptr + t * H + c, mask=cm, other=0.0).to(tl.float32)
        acc = acc.to(dt).to(tl.float32) + (s * sh).to(dt).to(tl.float32)
    tl.store(o_ptr + t * H + c, acc.to(dt), mask=cm)


# no FMA contraction: Triton narrows the gated add to bf16 ops and would fuse its multiply and add
# into one fma.rn.bf16 (one rounding where torch's ops round twice: last-bit differences on the H200)
UNSORT_OPTIONS = {"enable_fp_fusion": False}


def unsort_sum(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor, T: int, gated=None) -> torch.Tensor:
    """y [T*k, H] expert-sorted rows, pos [T*k] each assignment's row, weights [T, k] -> [T, H]: each
    token's k rows weighted and summed in fp32; `gated` = (sh [T, H], g [T, 1]) adds sigmoid(g) * sh."""
    H, k = y.shape[1], weights.shape[1]
    if gated is not None and not FOLD_GATED:
        return unsort_sum(y, pos, weights, T) + torch.sigmoid(gated[1]) * gated[0]
    out = torch.empty(T, H, dtype=y.dtype, device=y.device)
    # the gate by torch's own sigmoid ([T, 1], one small launch): the block's output bit for bit
    sh, sg = (gated[0].contiguous(), torch.sigmoid(gated[1]).contiguous()) if gated is not None else (out, out)
    BH = min(1024, triton.next_power_of_2(H))
    _unsort_sum_kernel[(T, triton.cdiv(H, BH))](y, pos, weights.contiguous(), out, sh, sg, T, H, y.stride(0), TOPK=k,
                                                BH=BH, GATED=gated is not None, **UNSORT_OPTIONS)
    return out


def sort_rows(x: torch.Tensor, ids: torch.Tensor, num_experts: int, copy: bool = True):
    """x [T, H], ids [T, k] -> (xs [T*k, H] rows grouped by expert (None unless `copy`), counts [E]
    rows per expert, offs [E] int32 = each expert's end row in xs, pos [T*k] = each assignment's
    row in xs, src [T*k] = each row's token). No host sync; the order of rows within an expert is
    arbitrary (each row of a GEMM is computed alone)."""
    T, H = x.shape
    k = ids.shape[1]
    M = T * k
    flat = ids.reshape(-1).contiguous()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    rank = torch.empty(M, dtype=torch.int64, device=x.device)
    _count_kernel[(triton.cdiv(M, 256),)](flat, counts, rank, M, BLK=256)
    ends = torch.cumsum(counts, 0)
    xs = torch.empty(M if copy else 0, H, dtype=x.dtype, device=x.device)
    pos = torch.empty(M, dtype=torch.int64, device=x.device)
    src = torch.empty(M, dtype=torch.int64, device=x.device)
    BA, BH = 16, min(512, triton.next_power_of_2(H))
    _sort_rows_kernel[(triton.cdiv(M, BA),)](flat, rank, ends, counts, x, xs, pos, src, M, H, TOPK=k, BA=BA, BH=BH,
                                             COPY=copy)
    return (xs if copy else None), counts, ends.to(torch.int32), pos, src


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu [M, 2I] (rows may be padded) -> silu(gu[:, :I]) * gu[:, I:] [M, I]."""
    M, I = gu.shape[0], gu.shape[1] // 2
    h = torch.empty(M, I, dtype=gu.dtype, device=gu.device)
    BR, BI = 16, min(256, triton.next_power_of_2(I))
    _silu_mul_kernel[(triton.cdiv(M, BR), triton.cdiv(I, BI))](gu, h, M, I, gu.stride(0), BR=BR, BI=BI)
    return h


def moe_experts_sorted(x, gate_up_proj, down_proj, weights, ids, *, gemm: str = "triton_gather",
                       gated=None) -> torch.Tensor:
    """x [T, H]; gate_up_proj [E, 2I, H]; down_proj [E, H, I]; weights/ids [T, k] -> [T, H].
    gemm: one of GEMMS (the module docstring); gated = (sh [T, H], g [T, 1]): + sigmoid(g) * sh,
    added in the same pass as the k-sum (the MoE block's shared expert)."""
    T, H = x.shape
    E = gate_up_proj.shape[0]
    k = ids.shape[1]
    x = x.contiguous()
    gather = gemm in ("triton_gather", "gather_torch", "persistent", "persistent_mixed", "resident")
    xs, counts, offs, pos, src = sort_rows(x, ids, E, copy=not gather)
    if gemm == "persistent":
        tiles = moe_tma.tile_table(counts, T * k)
        h = moe_tma.gate_up(x, gate_up_proj, counts, src, tiles)  # [T*k, I]
        y = moe_tma.down(h, down_proj, counts, tiles)  # [T*k, H]
    elif gemm == "persistent_mixed":
        mtiles = moe_tma.tile_table(counts, T * k, moe_tma.MIXED_BM)
        h = moe_tma.gate_up(x, gate_up_proj, counts, src, mtiles, mixed=True)
        if MIXED_DOWN:
            y = moe_tma.down(h, down_proj, counts, mtiles, mixed=True)
        else:
            y = moe_tma.down(h, down_proj, counts, moe_tma.tile_table(counts, T * k))
    elif gemm == "resident":
        rtiles = moe_tma.tile_table(counts, T * k, moe_resident.ROWS)
        if RESIDENT_UP:
            h = moe_resident.gate_up(x, gate_up_proj, src, rtiles)
        else:
            h = moe_tma.gate_up(x, gate_up_proj, counts, src, moe_tma.tile_table(counts, T * k))
        y = moe_resident.down(h, down_proj, rtiles)
    else:
        if gather:
            h = moe_tma.gate_up(x, gate_up_proj, counts, src)
        elif gemm == "triton":
            h = moe_tma.gate_up(xs, gate_up_proj, counts)
        else:
            # [E, 2I, H] read as [E, H, 2I] (column-major B, the layout the TMA loads want): a view, no copy
            h = silu_mul(torch._grouped_mm(xs, gate_up_proj.transpose(1, 2), offs))
        if gemm in ("torch", "gather_torch"):
            y = torch._grouped_mm(h, down_proj.transpose(1, 2), offs)
        else:
            y = moe_tma.down(h, down_proj, counts)
    return unsort_sum(y, pos, weights, T, gated)
