"""Triton causal depthwise conv1d + SiLU: varlen prefill (with conv-state pool) and 1-token update.

Same signatures as kernels/conv1d.py. y[t, c] = silu(sum_j w[c, j] * x[t - (K-1) + j, c]); inputs
before a sequence's first token come from its conv state (the last K-1 pre-conv inputs) when it
has one, else are zero. Prefill is two launches: the conv reads the old states, then a second
kernel writes the new ones (a single launch would race: tiles of one sequence read the state
another tile would be shifting). Negative state slots (graph padding) are skipped.
`save_token_windows` (speculative verify) stores the window after every token in one launch, with
no host sync, so a verify forward can be graph-captured.
A column map whose aligned groups of 128 channels each read one contiguous run of 128 input columns
(the DeltaNet's grouped in_proj_qkvz output: heads of 128) is read in place by the varlen conv,
each channel tile from the column `map[first channel]` on (no gather, no copy of the input).
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ...env_switches import switch
from ._util import autotune, pow2, size_class


@triton.jit
def _x_cols(map_ptr, c, cm, MAP: tl.constexpr):
    """[BC] input column of channels c: c itself (MAP 0), or map[c] (the layer's grouped projection
    read in place), the map running contiguously in aligned groups of MAP channels: told to the
    compiler so the loads stay vectorised."""
    col = c
    if MAP > 0:
        col = tl.max_contiguous(tl.multiple_of(tl.load(map_ptr + c, mask=cm, other=0), MAP), MAP)
    return col


_RUNS: dict[int, tuple] = {}  # id(map tensor) -> (weakref to it, its version, run)
MAP_BC = 128  # channel tile of the varlen conv over a map read in place (runs of 128 columns)


def _map_run(cols: torch.Tensor) -> int:
    """The longest of MAP_BC (128) and 16 such that a column map runs contiguously in aligned groups
    of that many channels, each starting at a multiple of it; else 1. Checked once per map tensor (a
    host sync, so not while a CUDA graph is being captured: then 1)."""
    # inference tensors keep no version counter (and cannot be written outside inference mode)
    version = -1 if cols.is_inference() else cols._version
    hit = _RUNS.get(id(cols))
    if hit is not None and hit[0]() is cols and hit[1] == version:
        return hit[2]
    if cols.is_cuda and torch.cuda.is_current_stream_capturing():
        return 1
    c, run = cols.cpu(), 1
    for n in (MAP_BC, 16):
        if c.numel() % n == 0:
            v = c.view(-1, n)
            if bool((v - v[:, :1] == torch.arange(n)).all()) and bool((v[:, 0] % n == 0).all()):
                run = n
                break
    if len(_RUNS) > 256:  # drop entries of freed maps
        for k in [k for k, v in _RUNS.items() if v[0]() is None]:
            del _RUNS[k]
    _RUNS[id(cols)] = (weakref.ref(cols), version, run)
    return run


def _inputs(x: torch.Tensor, C: int, x_cols: torch.Tensor | None):
    """-> (x with a unit column stride, its row stride, the column map or a dummy, MAP constant)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x_cols is None:
        if x.shape[-1] != C:
            raise ValueError(f"x has {x.shape[-1]} channels, the weight {C}")
        return x, x.stride(0), x, 0
    if x_cols.shape != (C,):
        raise ValueError(f"x_cols must be [{C}] (one input column per channel)")
    if _map_run(x_cols) == 1:
        # other maps: gathered once (unhinted gathers ran 5x slower, and Triton 3.6 failed to compile
        # some of their tiles)
        x = x.index_select(1, x_cols)
        return x, x.stride(0), x, 0
    return x, x.stride(0), x_cols, 16  # (128-runs are 16-runs too: one variant of these kernels)


@triton.jit
def _token_seq(cu_ptr, B, P, t):
    """Sequence of each flat token t (a [BT] vector or a scalar): the last b < B with cu[b] <= t (cu
    non-decreasing), by a branch-free binary search from step P (the largest power of two <= B - 1;
    0 for one sequence). Candidates past B read cu[B] = T > t: never taken, no mask needed."""
    seq = t * 0
    step = P
    while step > 0:
        cand = seq + step
        seq = tl.where(tl.load(cu_ptr + tl.minimum(cand, B)) <= t, cand, seq)
        step = step // 2
    return seq


@triton.jit(do_not_specialize=["T", "TB", "B", "P"])
def _conv_varlen_body(x_ptr, w_ptr, y_ptr, cu_ptr, B, P, st_ptr, slot_ptr, init_ptr, map_ptr,
                      T, C, TB, SX, scale, K: tl.constexpr, HAS_STATE: tl.constexpr,
                      QK_HEADS: tl.constexpr, DK: tl.constexpr, MAPPED: tl.constexpr,
                      FIXUP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    if FIXUP:
        # sequence pid_t's first K-1 tokens only (BT >= K-1): the rows whose taps reach its state
        bos0 = tl.load(cu_ptr + pid_t).to(tl.int32)
        t = bos0 + tl.arange(0, BT)
        tm = t < tl.minimum(bos0 + K - 1, tl.load(cu_ptr + pid_t + 1).to(tl.int32))
    else:
        t = pid_t * BT + tl.arange(0, BT)              # [BT] flat token index
        tm = t < T
    c = pid_c * BC + tl.arange(0, BC)                  # [BC] channel
    cm = c < C
    offs = (t.to(tl.int64) * C)[:, None] + c[None, :]                   # [BT, BC] this token's outputs
    xc = c
    if MAPPED:
        # the tile's channels read one contiguous run of input columns (BC == MAP_BC), from map[c0] on
        xc = tl.max_contiguous(tl.multiple_of(tl.load(map_ptr + pid_c * BC) + tl.arange(0, BC), 16), BC)
    ptrs = x_ptr + (t.to(tl.int64) * SX)[:, None] + xc[None, :]                 # and inputs
    m2 = tm[:, None] & cm[None, :]
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    # a tile whose rows all sit >= K-1 tokens into their sequence reads no state and masks no tap
    seq = (t * 0 + pid_t) if FIXUP else _token_seq(cu_ptr, B, P, t)
    bos = tl.load(cu_ptr + seq, mask=tm, other=0)
    near_start = tl.min(tl.where(tm, t - bos, K), 0) < K - 1
    if near_start:
        if HAS_STATE:
            slot = tl.load(slot_ptr + seq, mask=tm, other=0)
            init = tl.load(init_ptr + seq, mask=tm, other=0) != 0
        for j in tl.static_range(K):
            src = t - (K - 1) + j                      # [BT]
            inside = src >= bos
            xv = tl.load(ptrs - (K - 1 - j) * SX, mask=m2 & inside[:, None], other=0.0).to(tl.float32)
            if HAS_STATE:
                # position src - bos < 0 lives in the state column (K-1) + (src - bos)
                col = (K - 1) + src - bos
                sm = tm & (~inside) & init & (slot >= 0)
                sv = tl.load(st_ptr + (slot.to(tl.int64)[:, None] * C + c[None, :]) * (K - 1) + col[:, None],
                             mask=sm[:, None] & cm[None, :], other=0.0).to(tl.float32)
                xv += sv
            wj = tl.load(w_ptr + c * K + j, mask=cm, other=0.0).to(tl.float32)
            acc += xv * wj[None, :]
    else:
        for j in tl.static_range(K):
            xv = tl.load(ptrs - (K - 1 - j) * SX, mask=m2, other=0.0).to(tl.float32)
            wj = tl.load(w_ptr + c * K + j, mask=cm, other=0.0).to(tl.float32)
            acc += xv * wj[None, :]
    y = acc / (1.0 + tl.exp(-acc))
    if QK_HEADS > 0:
        # the first QK_HEADS heads of DK channels (q heads, then as many k heads) L2-normalised in
        # fp32, q also scaled: the delta rule reads them straight from y (DK divides BC)
        y3 = tl.reshape(y, [BT, BC // DK, DK])
        inv = 1.0 / tl.sqrt(tl.sum(y3 * y3, 2) + 1e-6)                      # [BT, BC // DK]
        head = pid_c * (BC // DK) + tl.arange(0, BC // DK)
        f = tl.where(head < QK_HEADS // 2, inv * scale, tl.where(head < QK_HEADS, inv, 1.0))
        y = tl.reshape(y3 * f[:, :, None], [BT, BC])
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m2)


# (BT tokens, BC channels, warps) per program; the first is the H200's pick at 8K tokens (timed among
# eight tiles, session 2) and the interpreter's. With the q / k norm a tile must hold whole heads
# (BC >= 128, all three do). Fewer candidates: each one timed is a compile in every process.
_CONFIGS = [(32, 128, 4), (16, 256, 4), (64, 128, 4)]


def _prune(configs, nargs, **kw):
    """Batches of the 512 / 4096 size classes take the measured pick; smaller ones time all three."""
    return configs[:1] if nargs["TB"] >= 512 else configs


_tiles = [triton.Config({"BT": bt, "BC": bc}, num_warps=w) for bt, bc, w in _CONFIGS]
_conv_varlen_kernel = autotune(_tiles, key=["C", "TB"], prune_configs_by={"early_config_prune": _prune})(
    _conv_varlen_body)
_conv_varlen_norm_kernel = autotune(_tiles, key=["C", "TB", "DK"], prune_configs_by={"early_config_prune": _prune})(
    _conv_varlen_body)
# a map read in place: tiles as wide as its runs
_map_tiles = [t for t in _tiles if t.kwargs["BC"] == MAP_BC]
_conv_varlen_map_kernel = autotune(_map_tiles, key=["C", "TB"], prune_configs_by={"early_config_prune": _prune})(
    _conv_varlen_body)
_conv_varlen_map_norm_kernel = autotune(_map_tiles, key=["C", "TB", "DK"],
                                        prune_configs_by={"early_config_prune": _prune})(_conv_varlen_body)
NORM_BC = 128  # the smallest tile of the norm variant: DK must divide it
# With a state pool the conv runs as two launches: all tiles without the state (taps before a
# sequence read zeros), then a small launch redoing each sequence's first K-1 rows with its state.
# The state path in every tile cost registers (triton 3.6, sm_90: 255 and 272 bytes of spills for
# the 32 x 128 tile vs 100 without it). False: one launch reading the state where needed.
SPLIT_STATE = False


@triton.jit
def _conv_state_kernel(x_ptr, cu_ptr, st_ptr, slot_ptr, init_ptr, map_ptr, C, SX,
                       K: tl.constexpr, KP: tl.constexpr, BC: tl.constexpr, MAPPED: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = c < C
    xc = c
    if MAPPED:  # as in the conv (BC == MAP_BC)
        xc = tl.load(map_ptr + tl.program_id(1) * BC) + tl.arange(0, BC)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    if slot >= 0:
        bos = tl.load(cu_ptr + b)
        n = tl.load(cu_ptr + b + 1) - bos
        i = tl.arange(0, KP)                           # state column
        im = i < K - 1
        init = tl.load(init_ptr + b + 0 * i) != 0      # [KP] (a vector: scalar masks upset the interpreter)
        src = n - (K - 1) + i                          # position in the sequence, <0: old state
        from_x = src >= 0
        xv = tl.load(x_ptr + (bos + src).to(tl.int64)[None, :] * SX + xc[:, None],
                     mask=cm[:, None] & (im & from_x)[None, :], other=0.0)
        old = tl.load(st_ptr + (slot * C + c[:, None]) * (K - 1) + ((K - 1) + src)[None, :],
                      mask=cm[:, None] & (im & (~from_x) & init)[None, :], other=0.0)
        # every column is read before any is overwritten (the shift reads columns to the right)
        tl.debug_barrier()
        new = tl.where(from_x[None, :], xv.to(st_ptr.dtype.element_ty), old)
        tl.store(st_ptr + (slot * C + c[:, None]) * (K - 1) + i[None, :], new, mask=cm[:, None] & im[None, :])


# The streaming form of the varlen conv (default; QWEN3NEXT_CONV_STREAM=0: the tiled kernels; K = 4 only):
# a program owns a block of BC channels and R runs of L tokens each, stepping through its runs one token per step with
# the last three inputs of every run kept in registers, so each input row is read once (plus a
# 3-row halo per run), the taps in registers for the whole run and the next rows loaded PF steps ahead.
# The loop ignores sequence starts; the first 3 rows of each sequence in the span are redone after it.
# H200, 80B layer at 8K (session 6): 96-100 us vs 185 us for the tiled kernel, outputs bitwise equal.
STREAM = switch("QWEN3NEXT_CONV_STREAM") == "1"
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# (R runs, L tokens per run, warps, PF rows loaded ahead: 1 to 4); L shrinks to cdiv(T, R) for short batches.
# H200 at 8K (benchmarks/gpu_prefill_profile.py): 95.9-123.6 us, the first 99.5; it stays the default as its
# shorter runs keep more programs in flight for shorter batches (ptxas, triton 3.6, sm_90: 112-156 registers, no spills; <= 128 for the 8-warp ones: 2 programs per SM).
STREAM_CONFIGS = [(16, 32, 8, 3), (16, 64, 8, 3), (16, 32, 8, 2), (8, 32, 4, 2), (8, 64, 4, 2), (8, 32, 4, 1),
                  (8, 32, 4, 4)]
STREAM_CFG = STREAM_CONFIGS[0]


@triton.jit
def _silu_norm(acc, pid_c, scale, QK_HEADS: tl.constexpr, FAST: tl.constexpr):
    """silu, then for a q / k head (BC == DK: channel block pid_c is head pid_c) the L2 norm of each
    row (q also scaled): a row sum, no reshape. FAST (compiled, not interpreted): the silu's exp and
    division in their flush-to-zero approximate forms (ex2 / rcp with no denormal fix-ups: ~6 of ~25
    instructions per value on sm_90; within 2 ulp of fp32, then rounded to bf16)."""
    if FAST:
        y = libdevice.fast_dividef(acc, 1.0 + libdevice.fast_expf(-acc))
    else:  # the interpreter (no libdevice): the default kernel's operations
        y = acc / (1.0 + tl.exp(-acc))
    if QK_HEADS > 0:  # noqa: SIM102 (a compile-time test around a run-time one)
        if pid_c < QK_HEADS:
            inv = 1.0 / tl.sqrt(tl.sum(y * y, 1) + 1e-6)                    # [rows]
            if pid_c < QK_HEADS // 2:
                inv = inv * scale
            y = y * inv[:, None]
    return y


@triton.jit
def _stream_row(xp, t0, s, T, L, SX, cm2):
    """[R, BC] inputs of step s of every run (zeros past the run or the batch)."""
    return tl.load(xp + s * SX, mask=cm2 & ((t0 + s < T) & (s < t0 * 0 + L))[:, None], other=0.0)


@triton.jit(do_not_specialize=["T", "B", "P", "L"])
def _conv_stream_kernel(x_ptr, w_ptr, y_ptr, cu_ptr, B, P, st_ptr, slot_ptr, init_ptr, map_ptr,
                        T, C, SX, scale, L, HAS_STATE: tl.constexpr, QK_HEADS: tl.constexpr,
                        MAPPED: tl.constexpr, R: tl.constexpr, BC: tl.constexpr, PF: tl.constexpr,
                        FAST: tl.constexpr):
    # channel blocks vary fastest: the programs running together read and write whole rows
    pid_c = tl.program_id(0)
    base = tl.program_id(1) * (R * L)                  # the program's first token
    end = tl.minimum(base + R * L, T)                  # and its end
    t0 = base + tl.arange(0, R) * L                    # [R] first token of each run
    c = pid_c * BC + tl.arange(0, BC)                  # [BC] channel
    cm = c < C
    cm2 = cm[None, :]
    xc = c
    if MAPPED:  # as in _conv_varlen_body (BC == MAP_BC)
        xc = tl.max_contiguous(tl.multiple_of(tl.load(map_ptr + pid_c * BC) + tl.arange(0, BC), 16), BC)
    w0 = tl.load(w_ptr + c * 4 + 0, mask=cm, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + c * 4 + 1, mask=cm, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + c * 4 + 2, mask=cm, other=0.0).to(tl.float32)
    w3 = tl.load(w_ptr + c * 4 + 3, mask=cm, other=0.0).to(tl.float32)
    xp = x_ptr + (t0.to(tl.int64) * SX)[:, None] + xc[None, :]            # [R, BC] run starts' inputs
    yp = y_ptr + (t0.to(tl.int64) * C)[:, None] + c[None, :]              # and outputs
    # halo: the three rows before each run
    # (carried in fp32: each input converted once, not at each of its four taps)
    x3 = tl.load(xp - 3 * SX, mask=cm2 & ((t0 >= 3) & (t0 - 3 < T))[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(xp - 2 * SX, mask=cm2 & ((t0 >= 2) & (t0 - 2 < T))[:, None], other=0.0).to(tl.float32)
    x1 = tl.load(xp - SX, mask=cm2 & ((t0 >= 1) & (t0 - 1 < T))[:, None], other=0.0).to(tl.float32)
    # the PF rows ahead of each run (bf16 in flight, packed: 4 registers per 8 inputs), oldest first
    xa = _stream_row(xp, t0, 0, T, L, SX, cm2)
    if PF >= 2:
        xb = _stream_row(xp, t0, 1, T, L, SX, cm2)
    if PF >= 3:
        xd = _stream_row(xp, t0, 2, T, L, SX, cm2)
    if PF >= 4:
        xe = _stream_row(xp, t0, 3, T, L, SX, cm2)
    # unrolled by 12 (the 3-input rotation, the PF-deep queue): carried values renamed, not moved
    for s in tl.range(0, L, loop_unroll_factor=12):
        t = t0 + s                                     # [R] this step's token of each run
        x0 = xa.to(tl.float32)
        # the rows PF steps ahead, issued before this step's math and store
        if PF == 1:
            xa = _stream_row(xp, t0, s + 1, T, L, SX, cm2)
        elif PF == 2:
            xa = xb
            xb = _stream_row(xp, t0, s + 2, T, L, SX, cm2)
        elif PF == 3:
            xa, xb = xb, xd
            xd = _stream_row(xp, t0, s + 3, T, L, SX, cm2)
        else:
            xa, xb, xd = xb, xd, xe
            xe = _stream_row(xp, t0, s + 4, T, L, SX, cm2)
        # (the default kernel's order of the taps: the same fp32 sums)
        acc = tl.zeros([R, BC], dtype=tl.float32)
        acc += x3 * w0[None, :]
        acc += x2 * w1[None, :]
        acc += x1 * w2[None, :]
        acc += x0 * w3[None, :]
        y = _silu_norm(acc, pid_c, scale, QK_HEADS, FAST)
        tl.store(yp + s * C, y.to(y_ptr.dtype.element_ty), mask=cm2 & (t < T)[:, None])
        x3, x2, x1 = x2, x1, x0
    # rows < 3 tokens into their sequence took taps across its start: redone from the conv state (or
    # zeros), as the default kernel's near-start tiles do, for every sequence meeting the span
    s_first = _token_seq(cu_ptr, B, P, base)
    s_last = _token_seq(cu_ptr, B, P, end - 1)
    if (base - tl.load(cu_ptr + s_first) < 3) | (s_last != s_first):
        tl.debug_barrier()  # (the loop's stores of these rows came from other threads)
        i = tl.arange(0, 4)                            # [4] row of the sequence (the 4th masked)
        xcol = xc[None, :]
        for b in range(s_first, s_last + 1):
            bos = tl.load(cu_ptr + b).to(tl.int32)
            t = bos + i
            tm = (i < 3) & (t >= base) & (t < end) & (t < tl.load(cu_ptr + b + 1))
            if HAS_STATE:
                slot = tl.load(slot_ptr + b + 0 * i)   # [4] (a vector: scalar masks upset the interpreter)
                sm = tm & (tl.load(init_ptr + b + 0 * i) != 0) & (slot >= 0)
            acc = tl.zeros([4, BC], dtype=tl.float32)
            for j in tl.static_range(4):
                src = t - 3 + j                        # [4]
                xv = tl.load(x_ptr + (src.to(tl.int64) * SX)[:, None] + xcol,
                             mask=(tm & (src >= bos))[:, None] & cm2, other=0.0).to(tl.float32)
                if HAS_STATE:  # position src - bos < 0 lives in state column 3 + src - bos
                    xv += tl.load(st_ptr + (slot.to(tl.int64)[:, None] * C + c[None, :]) * 3 + (3 + src - bos)[:, None],
                                  mask=(sm & (src < bos))[:, None] & cm2, other=0.0).to(tl.float32)
                wj = w0 if j == 0 else (w1 if j == 1 else (w2 if j == 2 else w3))
                acc += xv * wj[None, :]
            y = _silu_norm(acc, pid_c, scale, QK_HEADS, FAST)
            tl.store(y_ptr + (t.to(tl.int64) * C)[:, None] + c[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=tm[:, None] & cm2)

def causal_conv1d_varlen(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor,
                         conv_state: torch.Tensor | None = None, state_slots: torch.Tensor | None = None,
                         has_initial_state: torch.Tensor | None = None, *,
                         x_cols: torch.Tensor | None = None, qk_heads: tuple[int, int] | None = None) -> torch.Tensor:
    """x [T, C] pre-conv (any row stride), weight [C, K] -> silu(conv) [T, C]; conv_state
    [N, C, K-1] updated in place. x_cols [C] (optional): channel c is x[:, x_cols[c]] (x wider):
    read in place when it runs in aligned groups of MAP_BC columns (_map_run), else gathered here
    first (the one-token update and the fused verify kernel read 16-runs in place). qk_heads (Hk, dk) (optional, dk dividing NORM_BC): the DeltaNet's q and k heads (the first
    2 Hk dk channels) come out L2-normalised, q scaled by dk^-0.5 (kernels/gdn.py's qkv_gates)."""
    T = x.shape[0]
    C, K = weight.shape[0], weight.shape[-1]
    mapped = x_cols is not None and x.stride(-1) == 1 and _map_run(x_cols) == MAP_BC
    if mapped:
        if x_cols.shape != (C,):
            raise ValueError(f"x_cols must be [{C}] (one input column per channel)")
        SX, xmap = x.stride(0), x_cols
    else:
        if x_cols is not None:
            # gathered once: Triton 3.6 mis-compiles this kernel's two tap paths over gathered columns
            x = x.index_select(1, x_cols)
        x, SX, xmap, _ = _inputs(x, C, None)
    weight = weight.reshape(C, K).contiguous()
    y = torch.empty(T, C, dtype=x.dtype, device=x.device)
    B = cu_seqlens.numel() - 1
    if T == 0 or B == 0:
        return y
    cu = cu_seqlens.to(torch.int64).contiguous()
    has_state = conv_state is not None
    if has_state:
        slots = state_slots.to(torch.int64).contiguous()
        # bool or integer flags, read as they are (no cast launch per layer)
        init = (has_initial_state if has_initial_state is not None
                else torch.ones(B, dtype=torch.bool, device=x.device)).contiguous()
    else:
        slots, init = cu, cu
    # the conv writes only y (the states are moved on below), so timing configs is harmless
    grid = lambda meta: (triton.cdiv(T, meta["BT"]), triton.cdiv(C, meta["BC"]))  # noqa: E731
    if qk_heads is not None and NORM_BC % qk_heads[1]:
        raise ValueError(f"qk_heads: dk {qk_heads[1]} must divide {NORM_BC}")
    hk, dk = qk_heads or (0, 1)
    kernel = ((_conv_varlen_map_kernel, _conv_varlen_map_norm_kernel) if mapped
              else (_conv_varlen_kernel, _conv_varlen_norm_kernel))[qk_heads is not None]
    P = 1 << (B - 1).bit_length() - 1 if B > 1 else 0
    split = has_state and SPLIT_STATE and K > 1
    args = (x, weight, y, cu, B, P, conv_state if has_state else x, slots, init, xmap, T, C, size_class(T), SX,
            dk ** -0.5)
    if STREAM and K == 4 and (qk_heads is None or not mapped or dk == MAP_BC):
        bc = MAP_BC if mapped or qk_heads is None else dk  # (a q / k norm: one head per channel block)
        r, steps, warps, pf = STREAM_CFG
        steps = max(1, min(steps, triton.cdiv(T, r)))
        _conv_stream_kernel[(triton.cdiv(C, bc), triton.cdiv(T, r * steps))](
            x, weight, y, cu, B, P, conv_state if has_state else x, slots, init, xmap, T, C, SX, dk ** -0.5, steps,
            HAS_STATE=has_state, QK_HEADS=2 * hk, MAPPED=mapped, R=r, BC=bc, PF=pf,
            FAST=not _INTERPRET, num_warps=warps)
        split = False
    else:
        kernel[grid](*args, K=K, HAS_STATE=has_state and not split, QK_HEADS=2 * hk, DK=dk, MAPPED=mapped,
                     FIXUP=False)
    if split:  # (after the main launch: it wrote these rows without the state)
        bc = MAP_BC if mapped else NORM_BC
        _conv_varlen_body[(B, triton.cdiv(C, bc))](*args, K=K, HAS_STATE=True, QK_HEADS=2 * hk, DK=dk, MAPPED=mapped,
                                                   FIXUP=True, BT=pow2(K - 1, 2), BC=bc, num_warps=4)
    if has_state:
        bc = MAP_BC if mapped else 256
        _conv_state_kernel[(B, triton.cdiv(C, bc))](x, cu, conv_state, slots, init, xmap, C, SX, K=K,
                                                   KP=triton.next_power_of_2(max(K - 1, 1)), BC=bc, MAPPED=mapped)
    return y


@triton.jit
def _conv_update_kernel(x_ptr, w_ptr, y_ptr, st_ptr, slot_ptr, map_ptr, C, SX,
                        K: tl.constexpr, KP: tl.constexpr, BC: tl.constexpr, MAP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = c < C
    slot = tl.load(slot_ptr + b).to(tl.int64)
    if slot >= 0:
        i = tl.arange(0, KP)
        im = i < K - 1
        st = tl.load(st_ptr + (slot * C + c[:, None]) * (K - 1) + i[None, :],
                     mask=cm[:, None] & im[None, :], other=0.0)          # [BC, KP]
        xv = tl.load(x_ptr + b * SX + _x_cols(map_ptr, c, cm, MAP), mask=cm, other=0.0)   # [BC]
        w = tl.load(w_ptr + c[:, None] * K + i[None, :], mask=cm[:, None] & im[None, :], other=0.0)
        wl = tl.load(w_ptr + c * K + (K - 1), mask=cm, other=0.0).to(tl.float32)
        acc = tl.sum(st.to(tl.float32) * w.to(tl.float32), axis=1) + xv.to(tl.float32) * wl
        tl.store(y_ptr + b * C + c, (acc / (1.0 + tl.exp(-acc))).to(y_ptr.dtype.element_ty), mask=cm)
        # shift left by one and append x: new[i] = old[i + 1] (i < K-2), new[K-2] = x
        nxt = tl.load(st_ptr + (slot * C + c[:, None]) * (K - 1) + (i + 1)[None, :],
                      mask=cm[:, None] & (i + 1 < K - 1)[None, :], other=0.0)
        new = tl.where((i == K - 2)[None, :], xv[:, None].to(nxt.dtype), nxt)
        tl.debug_barrier()
        tl.store(st_ptr + (slot * C + c[:, None]) * (K - 1) + i[None, :], new, mask=cm[:, None] & im[None, :])


def causal_conv1d_update(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor,
                         state_slots: torch.Tensor, *, x_cols: torch.Tensor | None = None) -> torch.Tensor:
    """One token per sequence: x [B, C] (any row stride; x_cols as in causal_conv1d_varlen)
    -> silu(conv) [B, C]; conv_state[state_slots] shifted in place."""
    B = x.shape[0]
    C, K = weight.shape[0], weight.shape[-1]
    x, SX, xmap, map_run = _inputs(x, C, x_cols)
    y = torch.empty(B, C, dtype=x.dtype, device=x.device)
    if B:
        BC = 256
        _conv_update_kernel[(B, triton.cdiv(C, BC))](x, weight.reshape(C, K).contiguous(), y,
                                                     conv_state, state_slots.to(torch.int64).contiguous(), xmap,
                                                     C, SX, K=K, KP=triton.next_power_of_2(max(K - 1, 1)), BC=BC,
                                                     MAP=map_run)
    return y


@triton.jit(do_not_specialize=["B"])
def _token_windows_kernel(x_ptr, cu_ptr, B, st_ptr, slot_ptr, init_ptr, ts_ptr, C,
                          K1: tl.constexpr, KP: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = c < C
    dst = tl.load(ts_ptr + t)
    if dst >= 0:
        j = tl.arange(0, BB)
        ends = tl.load(cu_ptr + j + 1, mask=j < B, other=0)
        b = tl.sum(((ends <= t) & (j < B)).to(tl.int32), 0)           # sequence of token t
        bos = tl.load(cu_ptr + b)
        i = tl.arange(0, KP)                                          # state column
        im = i < K1
        # per-column copies of the scalars (scalar masks upset the interpreter)
        slot = tl.load(slot_ptr + b + 0 * i).to(tl.int64)
        init = tl.load(init_ptr + b + 0 * i)
        src = t - (K1 - 1) + i                                        # flat token of column i
        from_x = src >= bos
        xv = tl.load(x_ptr + src[None, :] * C + c[:, None], mask=cm[:, None] & (im & from_x)[None, :], other=0.0)
        # columns before the run come from the sequence's cached window (column K1 + src - bos)
        old_ok = im & (~from_x) & (init != 0) & (slot >= 0)
        old = tl.load(st_ptr + (slot[None, :] * C + c[:, None]) * K1 + (K1 + src - bos)[None, :],
                      mask=cm[:, None] & old_ok[None, :], other=0.0)
        new = tl.where(from_x[None, :], xv.to(st_ptr.dtype.element_ty), old)
        tl.store(st_ptr + (dst * C + c[:, None]) * K1 + i[None, :], new, mask=cm[:, None] & im[None, :])


def save_token_windows(x: torch.Tensor, cu_seqlens: torch.Tensor, conv_state: torch.Tensor,
                       state_slots: torch.Tensor, has_initial_state: torch.Tensor,
                       token_slots: torch.Tensor) -> None:
    """x [T, C] pre-conv; for every token t with token_slots[t] >= 0 store the K-1 pre-conv inputs
    ending at t (the sequence's cached window at state_slots supplying what precedes its run) into
    conv_state[token_slots[t]]. Call before the conv moves the states on; token slots must differ
    from the state slots (they are scratch slots)."""
    T, C = x.shape
    K1 = conv_state.shape[-1]
    B = cu_seqlens.numel() - 1
    if T == 0 or B == 0:
        return
    BC = 256
    _token_windows_kernel[(T, triton.cdiv(C, BC))](
        x.contiguous(), cu_seqlens.to(torch.int64).contiguous(), B, conv_state,
        state_slots.to(torch.int64).contiguous(), has_initial_state.to(torch.int32).contiguous(),
        token_slots.to(torch.int64).contiguous(), C, K1=K1, KP=triton.next_power_of_2(max(K1, 1)),
        BB=pow2(B, 2), BC=BC)
