"""Fused DeltaNet decode step (conv update + L2 norm + gating + recurrence) against the reference path."""

from __future__ import annotations

import pytest
import torch

from qwen3next.kernels.triton.gdn_decode import gdn_decode
from qwen3next.kernels.triton.gdn_decode_ref import gdn_decode_reference

from .conftest import DEV, randn, rel_err, seeded


def _case(B, hk, hv, dk, dv, K, N, dtype, seed):
    gen = seeded(seed)
    C = 2 * hk * dk + hv * dv
    return dict(
        m=randn(B, C, gen=gen, dtype=dtype), a=randn(B, hv, gen=gen, dtype=dtype),
        b=randn(B, hv, gen=gen, dtype=dtype), conv_weight=randn(C, K, gen=gen, dtype=dtype, scale=0.5),
        conv_state=randn(N, C, K - 1, gen=gen, dtype=dtype), recurrent_state=randn(N, hv, dk, dv, gen=gen, scale=0.1),
        A_log=randn(hv, gen=gen, scale=0.5), dt_bias=randn(hv, gen=gen, dtype=dtype), num_k_heads=hk)


def _run_both(args, slots, steps):
    a_t = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in args.items()}
    a_r = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in args.items()}
    for _ in range(steps):  # the states carry across steps
        o_t = gdn_decode(state_slots=slots, **a_t)
        o_r = gdn_decode_reference(state_slots=slots, **a_r)
    return o_t, o_r, a_t, a_r


def test_decode_matches_reference_over_steps():
    args = _case(B=3, hk=2, hv=4, dk=16, dv=32, K=4, N=5, dtype=torch.float32, seed=21)
    slots = torch.tensor([4, 0, 2], device=DEV)
    untouched = args["recurrent_state"][[1, 3]].clone()
    o_t, o_r, a_t, a_r = _run_both(args, slots, steps=3)
    assert rel_err(o_t, o_r) < 1e-5
    assert rel_err(a_t["recurrent_state"], a_r["recurrent_state"]) < 1e-5
    assert torch.equal(a_t["conv_state"], a_r["conv_state"])
    assert torch.equal(a_t["recurrent_state"][[1, 3]], untouched)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64, 256])
def test_decode_bf16_gpu(B):
    args = _case(B=B, hk=16, hv=32, dk=128, dv=128, K=4, N=B + 3, dtype=torch.bfloat16, seed=B)
    slots = torch.randperm(B + 3, device=DEV)[:B]
    o_t, o_r, a_t, a_r = _run_both(args, slots, steps=2)
    assert rel_err(o_t, o_r) < 1e-2
    assert rel_err(a_t["recurrent_state"], a_r["recurrent_state"]) < 1e-3
