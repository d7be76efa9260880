"""Block-FP8 weights held at run time (architecture.md §10; `quantization="fp8"`).

`Fp8Linear` replaces an `nn.Linear`: `weight` float8_e4m3fn [N, K] and `weight_scale_inv` fp32
[ceil(N/bn), ceil(K/bk)], the checkpoint's own names, so an FP8 checkpoint loads into it as is.
`to_fp8_(model, block, names)` swaps the chosen projections in and turns the routed experts'
stacked weights into fp8 (plus `gate_up_proj_scale_inv` / `down_proj_scale_inv`). On meta tensors
it only allocates (the loader fills them); on real ones it quantises the values (a bf16 model
quantised at load). Norms, embeddings, lm_head, the router, the shared-expert gate, conv,
in_proj_ba and mtp.fc stay in the model's dtype (what the official FP8 release leaves in bf16).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..kernels import fp8 as qfp8
from ..kernels import ops

# modules the official FP8 checkpoints store in fp8 (§10), matched on the exact module path
FP8_LINEAR = re.compile(r"(^|\.)(linear_attn\.(in_proj_qkvz|out_proj)|self_attn\.[qkvo]_proj"
                        r"|mlp\.(shared_expert\.)?(gate|up|down)_proj)$")
FP8_EXPERTS = re.compile(r"(^|\.)mlp\.experts$")
# the MoE block hands its fp8 shared expert to the fp8 experts' kernels up to this many routed rows
# (decode, verify; as triton/moe.py's SHARED_MAX_ROWS for bf16); prefill keeps three Fp8Linear calls
FUSED_SHARED_MAX_ROWS = 4096


class Fp8Linear(nn.Module):
    """y = x @ (weight * block scales)^T, no bias (ops.fp8_linear: Triton w8a16 on CUDA)."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int] = qfp8.BLOCK,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        sn, sk = -(-out_features // block[0]), -(-in_features // block[1])
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=qfp8.FP8, device=device),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(torch.empty(sn, sk, dtype=torch.float32, device=device),
                                             requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.fp8_linear(x.reshape(-1, self.in_features), self.weight, self.weight_scale_inv, self.block)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}"


def fp8_candidates(model: nn.Module) -> list[str]:
    """Module paths that hold fp8 weights under quantization="fp8" (§10's list)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and FP8_LINEAR.search(name) and mod.bias is None:
            out.append(name)
        elif FP8_EXPERTS.search(name) and hasattr(mod, "gate_up_proj"):
            out.append(name)
    return out


def experts_fit(mod: nn.Module, block: tuple[int, int]) -> bool:
    """Stacked gate|up rows keep whole scale blocks only when moe_intermediate_size % bn == 0."""
    return mod.down_proj.shape[-1] % block[0] == 0


@torch.no_grad()
def to_fp8_(model: nn.Module, block: tuple[int, int] = qfp8.BLOCK, names: list[str] | None = None) -> list[str]:
    """Swap the modules at `names` (default fp8_candidates) to fp8 in place; -> the paths converted
    (experts whose intermediate size does not fit the block are left as they are)."""
    block = tuple(block)
    done = []
    for name in fp8_candidates(model) if names is None else names:
        mod = model.get_submodule(name)
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if isinstance(mod, nn.Linear):
            w = mod.weight
            new = Fp8Linear(mod.in_features, mod.out_features, block, device=w.device)
            if w.device.type != "meta":
                w8, s = qfp8.quantize(w.detach(), block)
                new.weight.copy_(w8)
                new.weight_scale_inv.copy_(s)
            setattr(owner, attr, new)
            done.append(name)
        elif experts_fit(mod, block):
            for p in ("gate_up_proj", "down_proj"):
                w = getattr(mod, p)
                *lead, n, k = w.shape
                if w.device.type == "meta":
                    w8 = torch.empty(w.shape, dtype=qfp8.FP8, device="meta")
                    s = torch.empty(*lead, -(-n // block[0]), -(-k // block[1]), device="meta")
                else:  # one expert at a time: the fp32 temporaries stay small
                    w8 = torch.empty(w.shape, dtype=qfp8.FP8, device=w.device)
                    s = torch.empty(*lead, -(-n // block[0]), -(-k // block[1]), device=w.device)
                    for e in range(w.shape[0]):
                        w8[e], s[e] = qfp8.quantize(w[e], block)
                setattr(mod, p, nn.Parameter(w8, requires_grad=False))
                setattr(mod, p + "_scale_inv", nn.Parameter(s, requires_grad=False))
            mod.block = block
            done.append(name)
    return done


def fused_fp8_shared(moe: nn.Module, x: torch.Tensor) -> tuple | None:
    """(gate_proj, scale, up_proj, scale, down_proj, scale, shared_expert_gate) of a SparseMoeBlock
    whose routed experts and shared expert are both fp8 in one block size, for ops.moe_experts_fp8's
    `shared` (one call: on CUDA the shared expert rides in the experts' kernels); None when it does
    not apply (bf16, tensor parallel, prefill-sized batches: > FUSED_SHARED_MAX_ROWS routed rows)."""
    ex, se = moe.experts, moe.shared_expert
    mods = (se.gate_proj, se.up_proj, se.down_proj)
    if (ex.tp > 1 or ex.gate_up_proj.dtype != qfp8.FP8 or x.shape[0] * moe.top_k > FUSED_SHARED_MAX_ROWS
            or moe.shared_expert_gate.weight.dtype != x.dtype
            or not all(isinstance(m, Fp8Linear) and m.block == ex.block for m in mods)
            or se.gate_proj.out_features % 128):  # (the w8a8 kernels' 128-channel activation groups)
        return None
    return (*(t for m in mods for t in (m.weight, m.weight_scale_inv)), moe.shared_expert_gate.weight)


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype == qfp8.FP8
