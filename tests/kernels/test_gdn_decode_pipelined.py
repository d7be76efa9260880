"""The pipelined decode kernel (gdn_decode variant="pipelined", QWEN3NEXT_GDN_DECODE_PIPELINED=1)
against the reference on fp32 and bf16 pools: B = 1, 3, 64 rows on scattered slots, padded rows
(slot -1: o = 0, no state touched), states carried over several steps, several tile / item /
stage configurations; on GPU also against the default kernel at model shapes."""

from __future__ import annotations

import pytest
import torch

from qwen3next.kernels.triton import gdn_decode as mod
from qwen3next.kernels.triton.gdn_decode import gdn_decode
from qwen3next.kernels.triton.gdn_decode_ref import gdn_decode_reference

from .conftest import DEV, randn, rel_err, seeded

CONFIGS = [{}, {"bv": 8, "items": 4, "stages": 3}, {"bv": 32, "num_warps": 2, "items": 1}]


def _case(B, steps, hk, hv, dk, dv, N, state_dtype, seed, dtype=torch.float32):
    gen = seeded(seed)
    C = 2 * hk * dk + hv * dv
    return dict(
        m=randn(steps, B, C, gen=gen, dtype=dtype), a=randn(steps, B, hv, gen=gen, dtype=dtype),
        b=randn(steps, B, hv, gen=gen, dtype=dtype), conv_weight=randn(C, 4, gen=gen, dtype=dtype, scale=0.5),
        conv_state=randn(N, C, 3, gen=gen, dtype=dtype),
        recurrent_state=randn(N, hv, dk, dv, gen=gen, scale=0.1).to(state_dtype),
        A_log=randn(hv, gen=gen, scale=0.5), dt_bias=randn(hv, gen=gen, dtype=dtype), num_k_heads=hk)


def _steps(args, slots, steps, kernel, rows=None):
    """`steps` decode steps of `kernel` on a copy of the pools (rows: the batch rows it gets) ->
    (outputs [steps, B', Hv, dv], conv pool, recurrent pool)."""
    conv, rec = args["conv_state"].clone(), args["recurrent_state"].clone()
    rows = slice(None) if rows is None else rows
    fixed = {k: args[k] for k in ("conv_weight", "A_log", "dt_bias", "num_k_heads")}
    outs = [kernel(args["m"][s][rows], args["a"][s][rows], args["b"][s][rows], conv_state=conv,
                   recurrent_state=rec, state_slots=slots[rows], **fixed) for s in range(steps)]
    return torch.stack(outs), conv, rec


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# every configuration at B = 1 and 3; the big batch with the default one (interpreter time)
@pytest.mark.parametrize("B,cfg", [(B, c) for B in (1, 3) for c in range(len(CONFIGS))] + [(64, 0)])
def test_pipelined_matches_reference(B, cfg, state_dtype):
    steps, N = 3, B + 4
    args = _case(B, steps, 2, 4, 16, 32, N, state_dtype, seed=B + cfg)
    slots = torch.randperm(N, generator=seeded(B))[:B].to(DEV)
    if B > 1:
        slots[1] = -1  # a padded row (CUDA-graph batch)
    live = (slots >= 0).nonzero().flatten()
    o_t, conv_t, rec_t = _steps(args, slots, steps,
                                lambda *a, **kw: gdn_decode(*a, **kw, variant="pipelined", **CONFIGS[cfg]))
    o_r, conv_r, rec_r = _steps(args, slots, steps, gdn_decode_reference, rows=live)
    assert rel_err(o_t[:, live], o_r) < (1e-5 if state_dtype == torch.float32 else 1e-2)
    assert not o_t[:, slots < 0].any()
    assert rec_t.dtype == state_dtype
    assert rel_err(rec_t, rec_r) < (1e-5 if state_dtype == torch.float32 else 1e-2)
    assert torch.equal(conv_t, conv_r)
    untouched = torch.ones(N, dtype=torch.bool, device=DEV)
    untouched[slots[live]] = False
    assert torch.equal(rec_t[untouched], args["recurrent_state"][untouched])


def test_flag_selects_the_variant(monkeypatch):
    """variant=None follows the module flag (QWEN3NEXT_GDN_DECODE_PIPELINED); unknown names refused."""
    args = _case(2, 1, 2, 4, 16, 32, 3, torch.float32, seed=7)
    slots = torch.tensor([2, 0], device=DEV)
    launched = []
    monkeypatch.setattr(mod, "_launch_pipelined", lambda *a: launched.append(a[0].shape[0]))
    monkeypatch.setattr(mod, "PIPELINED", True)
    _steps(args, slots, 1, gdn_decode)
    assert launched == [2]
    monkeypatch.setattr(mod, "PIPELINED", False)
    _steps(args, slots, 1, gdn_decode)
    assert launched == [2]
    with pytest.raises(ValueError, match="variant"):
        _steps(args, slots, 1, lambda *a, **kw: gdn_decode(*a, **kw, variant="warp"))


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B", [1, 64, 256])
def test_pipelined_matches_default_gpu(B, state_dtype):
    """Model shapes (16 / 32 heads x 128 x 128), bf16 activations, 3 steps inside a CUDA graph."""
    N = B + 3
    args = _case(B, 3, 16, 32, 128, 128, N, state_dtype, seed=B, dtype=torch.bfloat16)
    slots = torch.randperm(N, generator=seeded(B))[:B].to(DEV)
    if B > 1:
        slots[-1] = -1
    o_d, conv_d, rec_d = _steps(args, slots, 3, lambda *a, **kw: gdn_decode(*a, **kw, variant="tiles"))
    conv, rec = args["conv_state"].clone(), args["recurrent_state"].clone()
    fixed = {k: args[k] for k in ("conv_weight", "A_log", "dt_bias", "num_k_heads")}
    m, a, b = (args[k][0].clone() for k in ("m", "a", "b"))

    def step():
        return gdn_decode(m, a, b, conv_state=conv, recurrent_state=rec, state_slots=slots, variant="pipelined",
                          **fixed)

    torch.cuda.synchronize()
    c0, r0 = conv.clone(), rec.clone()
    step()  # compile outside the capture
    conv.copy_(c0), rec.copy_(r0)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        o = step()
    conv.copy_(c0), rec.copy_(r0)
    outs = []
    for s in range(3):
        m.copy_(args["m"][s]), a.copy_(args["a"][s]), b.copy_(args["b"][s])
        g.replay()
        outs.append(o.clone())
    o_p = torch.stack(outs)
    assert rel_err(o_p, o_d) < 1e-2
    assert rel_err(rec, rec_d) < (1e-4 if state_dtype == torch.float32 else 1e-2)
    assert torch.equal(conv, conv_d)
    assert not o_p[:, slots < 0].any()
