"""bf16 / fp16 recurrent state pools (--mamba-ssm-cache-dtype) in the Triton DeltaNet kernels: the
decode step (gdn_decode.py) and the verify kernels (gdn_verify.py) load the pool to fp32, compute
in fp32 and round on store, matching the plain-torch definitions run on the same narrow pool; slots
outside the batch stay untouched. On GPU also the prefill path (ops.gdn_cached: conv -> prep ->
chunked rule) at model shapes, against the fp32 pool."""

from __future__ import annotations

import pytest
import torch

from qwen3next.kernels import gdn as ref
from qwen3next.kernels import ops
from qwen3next.kernels.triton import gdn_prep
from qwen3next.kernels.triton.gdn_decode import gdn_decode
from qwen3next.kernels.triton.gdn_decode_ref import gdn_decode_reference
from qwen3next.kernels.triton.gdn_verify import gdn_verify

from .conftest import DEV, cu, randn, rel_err, seeded

NARROW = [torch.bfloat16, torch.float16]


def _case(T, hk, hv, dk, dv, K, N, dtype, state_dtype, seed):
    gen = seeded(seed)
    C = 2 * hk * dk + hv * dv
    return dict(
        m=randn(T, C, gen=gen, dtype=dtype), a=randn(T, hv, gen=gen, dtype=dtype),
        b=randn(T, hv, gen=gen, dtype=dtype), conv_weight=randn(C, K, gen=gen, dtype=dtype, scale=0.5),
        conv_state=randn(N, C, K - 1, gen=gen, dtype=dtype),
        recurrent_state=randn(N, hv, dk, dv, gen=gen, scale=0.1).to(state_dtype),
        A_log=randn(hv, gen=gen, scale=0.5), dt_bias=randn(hv, gen=gen, dtype=dtype), num_k_heads=hk)


def _clone(args):
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in args.items()}


@pytest.fixture
def _plain_references(monkeypatch):
    """The references compose ops' kernels: keep those the plain-torch ones."""
    monkeypatch.setattr(ops, "_use_fast", lambda *t: False)
    monkeypatch.setattr(ops, "_ext_ok", lambda *t: False)
    monkeypatch.setattr(ops, "_use_triton", lambda *t: False)


def _rows(m, s, B):
    """Step s's inputs: rows s*B .. (s+1)*B of m."""
    return m[s * B:(s + 1) * B]


def _decode_steps(args, slots, steps, tol=1e-5):
    """`steps` decode steps of both; the first from identical pools (fp32 math: within `tol`), the
    later ones from pools whose elements may sit one rounding apart (fp32 sums in another order)."""
    a_t, a_r = _clone(args), _clone(args)
    B = slots.numel()
    for s in range(steps):
        o_t = gdn_decode(**{**a_t, "m": _rows(args["m"], s, B)}, state_slots=slots)
        o_r = gdn_decode_reference(**{**a_r, "m": _rows(args["m"], s, B)}, state_slots=slots)
        assert rel_err(o_t, o_r) < (tol if s == 0 else 1e-2)
    return a_t, a_r


@pytest.mark.parametrize("state_dtype", NARROW)
def test_decode_narrow_pool(state_dtype):
    B, steps = 3, 3
    args = _case(B * steps, 2, 4, 16, 32, 4, 6, torch.float32, state_dtype, seed=5)
    args["a"], args["b"] = args["a"][:B], args["b"][:B]
    slots = torch.tensor([4, 0, 2], device=DEV)
    before = args["recurrent_state"].clone()
    a_t, a_r = _decode_steps(args, slots, steps)
    S_t, S_r = a_t["recurrent_state"], a_r["recurrent_state"]
    assert S_t.dtype == state_dtype
    assert rel_err(S_t, S_r) < 1e-2  # one rounding apart at most
    assert not torch.equal(S_t[slots], before[slots])
    assert torch.equal(S_t[[1, 3, 5]], before[[1, 3, 5]])


@pytest.mark.parametrize("state_dtype", NARROW)
def test_verify_narrow_pool(state_dtype, _plain_references):
    """Runs of 1-4 tokens with per-token states into scratch slots 6..: every stored state rounded."""
    lens = [3, 1, 4]
    T = sum(lens)
    args = _case(T, 2, 4, 16, 32, 4, 6 + T, torch.float32, state_dtype, seed=9)
    slots = torch.tensor([2, 0, 5], device=DEV)
    pts = torch.arange(6, 6 + T, device=DEV)
    pts[1] = -1  # a skipped position keeps its slot as it was
    init = torch.tensor([True, False, True], device=DEV)
    a_t, a_r = _clone(args), _clone(args)
    o_t = gdn_verify(**a_t, cu_seqlens=cu(lens), state_slots=slots, has_initial_state=init, per_token_state_slots=pts)
    o_r = ref.gdn_cached(**a_r, cu_seqlens=cu(lens), state_slots=slots, has_initial_state=init,
                         per_token_state_slots=pts)
    assert rel_err(o_t, o_r) < 1e-5
    S_t, S_r = a_t["recurrent_state"], a_r["recurrent_state"]
    assert S_t.dtype == state_dtype
    touched = torch.cat([slots, pts[pts >= 0]])
    assert rel_err(S_t[touched], S_r[touched]) < 1e-2
    assert torch.equal(S_t[[1, 3, 4, 7]], args["recurrent_state"][[1, 3, 4, 7]])


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
def test_decode_bf16_pool_gpu(B):
    """Model shapes: the bf16 pool stays within bf16 rounding of the fp32 pool over 4 steps."""
    args = _case(4 * B, 16, 32, 128, 128, 4, B + 3, torch.bfloat16, torch.float32, seed=B)
    args["a"], args["b"] = args["a"][:B], args["b"][:B]
    slots = torch.randperm(B + 3, device=DEV)[:B]
    a32, a16 = _clone(args), _clone(args)
    a16["recurrent_state"] = a16["recurrent_state"].to(torch.bfloat16)
    for s in range(4):
        o32 = gdn_decode(**{**a32, "m": _rows(args["m"], s, B)}, state_slots=slots)
        o16 = gdn_decode(**{**a16, "m": _rows(args["m"], s, B)}, state_slots=slots)
    assert rel_err(o16, o32) < 1e-2
    assert rel_err(a16["recurrent_state"][slots], a32["recurrent_state"][slots]) < 1e-2
    # and the narrow pool against its own definition
    a_t, a_r = _decode_steps({**_clone(args), "recurrent_state": args["recurrent_state"].to(torch.bfloat16)},
                             slots, 2, tol=2e-2)
    assert rel_err(a_t["recurrent_state"][slots], a_r["recurrent_state"][slots]) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("per_token", [False, True])
def test_cached_bf16_pool_gpu(per_token, monkeypatch):
    """ops.gdn_cached (prefill chunks; verify with per-token states) on a bf16 pool vs an fp32 one."""
    monkeypatch.setattr(gdn_prep, "FUSED", True)
    lens = [3, 4, 2, 4] if per_token else [300, 17, 64, 1]
    T, N = sum(lens), len(lens) + 2 + sum(lens)
    args = _case(T, 16, 32, 128, 128, 4, N, torch.bfloat16, torch.float32, seed=T)
    slots = torch.arange(len(lens), device=DEV) + 1
    init = torch.tensor([True, False, True, True], device=DEV)
    pts = (torch.arange(T, device=DEV) + len(lens) + 2) if per_token else None
    a32, a16 = _clone(args), _clone(args)
    a16["recurrent_state"] = a16["recurrent_state"].to(torch.bfloat16)
    kw = dict(cu_seqlens=cu(lens), state_slots=slots, has_initial_state=init, per_token_state_slots=pts)
    o32 = ops.gdn_cached(**a32, **kw)
    o16 = ops.gdn_cached(**a16, **kw)
    assert a16["recurrent_state"].dtype == torch.bfloat16
    assert rel_err(o16, o32) < 1e-2
    touched = slots if pts is None else torch.cat([slots, pts])
    assert rel_err(a16["recurrent_state"][touched], a32["recurrent_state"][touched]) < 1e-2
