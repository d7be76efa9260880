"""Triton w8a8 block-FP8 linear for many rows (prefill): y = x @ dequant(W8)^T with the activations
quantised too (DeepSeek-V3 style), fp8 x fp8 on the tensor cores at ~2x bf16's rate.

x [M, K] is quantised per token and 128-channel group (one pass, `quantize_act`: kernels/fp8.py's
quantize_act; the scales are stored k-block-major so a tile's BM row scales are one contiguous
read); then per (BM x BN) output tile and 128-wide k step, TMA brings the fp8 tiles of x and W
([N, K], K contiguous: the K-major B operand fp8 wgmma needs), their fp32 product is scaled by
act_scale[m, kb] * w_scale[n // bn, kb] and summed in fp32; the tile leaves in x's dtype.
linear_fp8.fp8_linear dispatches here when DENSE_A8 is on (kernels/fp8.py fp8_linear_a8: the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._util import autotune, size_class

FP8_MAX = tl.constexpr(448.0)  # largest finite e4m3fn value
GROUP = 128  # activation group = the k step = the weight's scale block along K


def _set_blocks(nargs):
    """Autotune pre-hook: the descriptors' boxes follow the config's tile sizes."""
    nargs["a_desc"].block_shape = [nargs["BM"], GROUP]
    nargs["b_desc"].block_shape = [nargs["BN"], GROUP]


# (BM, BN, warps, stages); the first is the interpreter's and QWEN3NEXT_AUTOTUNE=0's (vLLM's tuned
# H200 choice for block-fp8 at M >= 1024). Two fp32 [BM, BN] tiles live in registers (the running
# sum and the step's product): 64 x 128 over 4 warps is ~160 registers a thread, and with 3 stages
# of (BM + BN) * 128 bytes three programs share an SM; 128 x 256 spills (not listed). Kept to four:
# each is compiled twice (K = 512 and K >= 2048 specialise apart) when a prefill first autotunes.
_CONFIGS = [triton.Config({"BM": bm, "BN": bn, "WS": False}, num_warps=w, num_stages=s, pre_hook=_set_blocks)
            for bm, bn, w, s in ((64, 128, 4, 3), (128, 128, 8, 3), (64, 128, 4, 4), (64, 256, 8, 3))]
# Triton's automatic warp specialisation (a TMA producer warp beside the MMA + scaling consumers);
# these compile for sm_90 under triton 3.6 (128 x 128 over 4 warps does not; 8 warps are not
# specialised) but are unproven on the H200: the benchmark times them, the autotuner does not.
WS_CONFIGS = [triton.Config({"BM": bm, "BN": bn, "WS": True}, num_warps=w, num_stages=s, pre_hook=_set_blocks)
              for bm, bn, w, s in ((64, 128, 4, 3), (64, 128, 4, 4))]


@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, M, K, BR: tl.constexpr, G: tl.constexpr):
    """BR rows x one group of G channels -> fp8 values q [M, K] and scales max|x| / 448 at s [SK, M]."""
    r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    g = tl.program_id(1)
    c = g * G + tl.arange(0, G)
    msk = (r < M)[:, None] & (c < K)[None, :]
    x = tl.load(x_ptr + r[:, None] * K + c[None, :], mask=msk, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), 1)                                        # [BR]
    # IEEE divisions (div_rn; `/` is the ~2-ulp approximate one on GPUs): torch's bits exactly
    sc = tl.where(amax > 0, tl.math.div_rn(amax, FP8_MAX), 1.0)
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, sc[:, None]), -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + r[:, None] * K + c[None, :], q.to(q_ptr.dtype.element_ty), mask=msk)
    tl.store(s_ptr + g * M + r, sc, mask=r < M)


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x8 [M, K] fp8, scale [M, ceil(K/128)] fp32 as a transposed view of a
    contiguous [ceil(K/128), M]): kernels/fp8.quantize_act's values."""
    M, K = x.shape
    SK = triton.cdiv(K, GROUP)
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    st = torch.empty(SK, M, dtype=torch.float32, device=x.device)
    if M:
        BR = 32
        _quant_kernel[(triton.cdiv(M, BR), SK)](x.contiguous(), q, st, M, K, BR=BR, G=GROUP)
    return q, st.t()


@autotune(_CONFIGS, key=["N", "K", "MC"])
@triton.jit(do_not_specialize=["M", "MC"])
def _a8_kernel(a_desc, b_desc, xs_ptr, s_ptr, y_ptr, M, N, K, MC, SK, BLK_N: tl.constexpr, GROUP_M: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, WS: tl.constexpr):
    """Program = one (BM, BN) tile of y, tiles ordered in GROUP_M-tall column bands (a band's x rows
    and weight columns stay in L2). a_desc: x8 [M, K]; b_desc: w8 [N, K]; xs_ptr: act scales
    [SK, M]; s_ptr: weight scales [ceil(N/BLK_N), SK]. TMA zero-fills past M, N and K."""
    pid = tl.program_id(0)
    nm_ = tl.cdiv(M, BM)
    nn_ = tl.cdiv(N, BN)
    band = GROUP_M * nn_
    first = (pid // band) * GROUP_M
    rows = tl.minimum(nm_ - first, GROUP_M)
    pm = first + (pid % band) % rows
    pn = (pid % band) // rows
    m0 = pm * BM
    n0 = pn * BN
    m = m0 + tl.arange(0, BM)
    n = n0 + tl.arange(0, BN)
    # scale pointers of clamped rows / columns (no masks: rows and columns past M, N are computed
    # from a real scale and never stored); one scalar when the tile lies in one weight scale block
    xs_col = xs_ptr + tl.minimum(m, M - 1)                              # [BM], + kb * M
    if BLK_N % BN == 0:
        ws_row = s_ptr + (n0 // BLK_N) * SK                             # scalar, + kb
    else:
        ws_row = s_ptr + (tl.minimum(n, N - 1) // BLK_N) * SK           # [BN], + kb
    # the scales of step kb + 1 are loaded during step kb's MMA: Triton's pipeliner only
    # prefetches dot operands, and a plain load here would put an L2 round trip after every MMA
    xs_nxt = tl.load(xs_col)
    ws_nxt = tl.load(ws_row)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in tl.range(0, SK, warp_specialize=WS):
        xs = xs_nxt
        ws = ws_nxt
        kn = tl.minimum(kb + 1, SK - 1)
        xs_nxt = tl.load(xs_col + kn * M)
        ws_nxt = tl.load(ws_row + kn)
        k0 = kb * 128
        a = a_desc.load([m0, k0])                                       # [BM, 128] fp8
        b = b_desc.load([n0, k0])                                       # [BN, 128] fp8, K contiguous
        if BLK_N % BN == 0:  # one FMA per element (the scaling sits between MMAs on the CUDA cores)
            acc += tl.dot(a, b.T) * (xs * ws)[:, None]
        else:
            acc += tl.dot(a, b.T) * (xs[:, None] * ws[None, :])
    mm = m < M
    nm = n < N
    out = y_ptr + m.to(tl.int64)[:, None] * N + n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])


def supports(w8: torch.Tensor, block: tuple[int, int]) -> bool:
    """The kernel's conditions: 128-wide scale blocks along K (= the activation group), a weight TMA
    can read (16-byte aligned base and rows) and a GPU with TMA and fp8 MMAs (sm_90+; the
    interpreter's CPU tensors pass)."""
    return (block[1] == GROUP and w8.shape[1] % 16 == 0 and w8.data_ptr() % 16 == 0 and w8.stride(1) == 1
            and (w8.device.type != "cuda" or torch.cuda.get_device_capability(w8.device)[0] >= 9))


def gemm_a8(x8: torch.Tensor, xs: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
            dtype: torch.dtype, config: triton.Config | None = None) -> torch.Tensor:
    """x8 [M, K] fp8 + scales xs [M, SK] (quantize_act's transposed view), w8 [N, K] fp8 + scale
    [ceil(N/bn), SK] -> y [M, N] in `dtype`. `config` (one of _CONFIGS) skips the autotuner (tests,
    benchmarks)."""
    M, K = x8.shape
    N = w8.shape[0]
    SK = triton.cdiv(K, GROUP)
    if xs.shape != (M, SK) or xs.stride() != (1, M) or scale.shape[1] != SK:
        raise ValueError(f"gemm_a8: act scales must be quantize_act's [{M}, {SK}] view and weight scales "
                         f"[*, {SK}], got {tuple(xs.shape)} / {tuple(scale.shape)}")
    y = torch.empty(M, N, dtype=dtype, device=x8.device)
    if M == 0:
        return y
    dummy = [1, 1]  # boxes set by the pre-hook
    a = TensorDescriptor(x8, [M, K], [K, 1], dummy)
    b = TensorDescriptor(w8, [N, K], [w8.stride(0), 1], dummy)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    args = (a, b, xs, scale.contiguous(), y, M, N, K, size_class(M), SK)
    if config is None:
        _a8_kernel[grid](*args, BLK_N=block[0], GROUP_M=8)
    else:
        _set_blocks({"a_desc": a, "b_desc": b, **config.kwargs})
        _a8_kernel.fn[grid(config.kwargs)](*args, BLK_N=block[0], GROUP_M=8, num_warps=config.num_warps,
                                           num_stages=config.num_stages, **config.kwargs)
    return y


def fp8_linear_a8(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """x [M, K] (bf16 / fp32) -> [M, N] in x's dtype: quantize_act, then gemm_a8."""
    if not supports(w8, block):
        raise ValueError(f"fp8_linear_a8 needs weight_block_size[1] == 128 and a 16-byte aligned weight "
                         f"with K % 16 == 0, got block {tuple(block)}, K {w8.shape[1]}")
    x8, xs = quantize_act(x)
    return gemm_a8(x8, xs, w8, scale, block, x.dtype)
