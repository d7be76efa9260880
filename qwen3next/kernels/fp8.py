"""Block-FP8 weights (architecture.md §10) and the references for their matmuls.

A weight W [N, K] is held as `float8_e4m3fn` W8 plus fp32 `scale_inv` [ceil(N/bn), ceil(K/bk)]:
W ~= W8[i, j] * scale_inv[i // bn, j // bk] (a multiplication). The references dequantise, then
run the bf16/fp32 computation of kernels/moe.py; the Triton kernels (triton/linear_fp8.py,
triton/moe_fp8.py) are tested against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .moe import moe_experts_by

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
BLOCK = (128, 128)


def _expand(scale: torch.Tensor, n: int, k: int, block: tuple[int, int]) -> torch.Tensor:
    """[..., ceil(n/bn), ceil(k/bk)] -> [..., n, k] (each block's scale repeated over its block)."""
    return scale.float().repeat_interleave(block[0], -2)[..., :n, :].repeat_interleave(block[1], -1)[..., :k]


def dequantize(w8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = BLOCK,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w8 [..., N, K] fp8, scale [..., ceil(N/bn), ceil(K/bk)] -> [..., N, K] in `dtype`."""
    n, k = w8.shape[-2:]
    return (w8.float() * _expand(scale, n, k, block)).to(dtype)


def quantize(w: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (w8 [..., N, K] fp8, scale [..., ceil(N/bn), ceil(K/bk)] fp32), scale =
    max|w| / 448 per block (an all-zero block gets scale 1)."""
    *lead, n, k = w.shape
    bn, bk = block
    pn, pk = -n % bn, -k % bk
    wp = F.pad(w.float(), (0, pk, 0, pn))  # [..., N', K'] whole blocks
    blocks = wp.view(*lead, (n + pn) // bn, bn, (k + pk) // bk, bk)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., nb, kb]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    w8 = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return w8.view(*lead, n + pn, k + pk)[..., :n, :k].contiguous(), scale


def quantize_act(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantisation (§10 "dynamic"): x [M, K] -> (x8 [M, K] fp8, scale
    [M, ceil(K/group)] fp32), scale = max|x| / 448 per token and group of `group` channels."""
    m, k = x.shape
    xp = F.pad(x.float(), (0, -k % group)).view(m, -1, group)
    amax = xp.abs().amax(-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    x8 = (xp / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(m, -1)[:, :k]
    return x8.contiguous(), scale


def _act(x: torch.Tensor, act_quant: bool) -> torch.Tensor:
    """x itself, or (act_quant) x after a round trip through per-token-group fp8, in fp32."""
    if not act_quant:
        return x
    x8, s = quantize_act(x)
    return dequantize(x8, s, (1, 128))


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = BLOCK):
    """x [M, K] @ dequant(w8 [N, K])^T -> [M, N] in x's dtype (the weight rounded to x's dtype first,
    as a dequantised bf16 model computes)."""
    return x @ dequantize(w8, scale, block, x.dtype).t()


def fp8_linear_a8(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = BLOCK,
                  act: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """w8a8 (triton/linear_fp8_a8.py): x [M, K] quantised per token and 128-channel group
    (quantize_act; or `act` = (x8 [M, K], scale [M, K/128]) already quantised), times dequant(w8)^T
    in fp32, rounded to x's dtype once."""
    x8, xs = quantize_act(x) if act is None else act
    return (dequantize(x8, xs, (1, 128)) @ dequantize(w8, scale, block).t()).to(x.dtype)


def _swiglu(x: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor, act_quant: bool) -> torch.Tensor:
    """(silu(x Wg^T) * (x Wu^T)) W_d^T with w_gu = [Wg; Wu] [2I, H], w_d [H, I] (already dequantised),
    products rounded to x's dtype; `act_quant`: each matmul's input round-trips per-token-group fp8."""
    inter = w_d.shape[-1]
    gu = (_act(x, act_quant) @ w_gu.t()).to(x.dtype)
    h = F.silu(gu[:, :inter]) * gu[:, inter:]  # [n, I]
    return (_act(h, act_quant) @ w_d.t()).to(x.dtype)


def moe_experts_fp8(x, gate_up_proj, gate_up_scale, down_proj, down_scale, weights, ids,
                    block: tuple[int, int] = BLOCK, act_quant: bool = False, shared=None) -> torch.Tensor:
    """kernels/moe.py's moe_experts over fp8 experts: gate_up_proj [E, 2I, H] fp8 with scale
    [E, 2I/bn, H/bk], down_proj [E, H, I] fp8 with scale [E, H/bn, I/bk]; only the experts that
    received tokens are dequantised. `act_quant`: each matmul's input is first quantised per token
    and 128-channel group (w8a8, as the fp8 tensor-core kernels compute) and the products are
    fp32, rounded to x's dtype after. `shared` = (gate_proj [Is, H], its scale, up_proj, its scale,
    down_proj [H, Is], its scale, shared_expert_gate [1, H] in x's dtype): the MoE block's gated
    shared expert added, routed + sigmoid(x gate^T) * shared_expert(x), as layers/moe.py computes."""
    wdt = torch.float32 if act_quant else x.dtype

    def expert(e: int, xe: torch.Tensor) -> torch.Tensor:
        return _swiglu(xe, dequantize(gate_up_proj[e], gate_up_scale[e], block, wdt),
                       dequantize(down_proj[e], down_scale[e], block, wdt), act_quant)

    routed = moe_experts_by(x, weights, ids, gate_up_proj.shape[0], expert)
    if shared is None:
        return routed
    g8, gs, u8, us, d8, ds, gate_w = shared
    w_gu = torch.cat([dequantize(g8, gs, block, wdt), dequantize(u8, us, block, wdt)])
    out = _swiglu(x, w_gu, dequantize(d8, ds, block, wdt), act_quant)
    return routed + torch.sigmoid(x @ gate_w.t()) * out
