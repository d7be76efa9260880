"""The fused DeltaNet GPU paths against kernels/gdn.py: the pre-processing kernel (`qkv_gates_`:
q / k norms in place + gates), the cached core through it (conv -> prep -> chunked delta rule),
and the fused verify kernels (per-token states)."""

from __future__ import annotations

import functools

import pytest
import torch

from qwen3next.kernels import gdn as ref
from qwen3next.kernels import ops
from qwen3next.kernels.triton import gdn_prep, gdn_verify

from .conftest import DEV, cu, randn, rel_err, seeded


def _case(T, hk, hv, dk, dv, K, N, dtype, seed):
    """Layer-like inputs; a / b are row-strided views of one [T, 2 Hv] projection, as the layer's."""
    gen = seeded(seed)
    C = 2 * hk * dk + hv * dv
    ba = randn(T, 2 * hv, gen=gen, dtype=dtype)
    return dict(
        m=randn(T, C, gen=gen, dtype=dtype), b=ba[:, :hv], a=ba[:, hv:],
        conv_weight=randn(C, K, gen=gen, dtype=dtype, scale=0.5),
        conv_state=randn(N, C, K - 1, gen=gen, dtype=dtype), recurrent_state=randn(N, hv, dk, dv, gen=gen, scale=0.1),
        A_log=randn(hv, gen=gen, scale=0.5), dt_bias=randn(hv, gen=gen, dtype=dtype), num_k_heads=hk)


def _clone(args):
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in args.items()}


def test_prep_matches_qkv_gates():
    hk, hv, dk, dv = 2, 4, 16, 32
    args = _case(37, hk, hv, dk, dv, 4, 1, torch.float32, seed=3)
    wide = randn(37, 2 * hk * dk + hv * dv + 8, gen=seeded(4))
    mc = wide[:, 8:]  # a row-strided post-conv view: normalised in place
    want = ref.qkv_gates(mc.clone(), args["a"], args["b"], args["A_log"], args["dt_bias"], hk, dk, hv, dv)
    got = gdn_prep.qkv_gates_(mc, args["a"], args["b"], args["A_log"], args["dt_bias"], hk, dk, hv, dv)
    for x, y in zip(got, want):
        assert x.shape == y.shape
        assert rel_err(x, y) < 1e-6
    assert got[0].data_ptr() == mc.data_ptr()  # views of mc, no copies


def _run_cached(fn, args, batches):
    """Calls `fn` over successive varlen batches (states carried) -> outputs concatenated."""
    outs = []
    for lens, slots, init, pts in batches:
        n = sum(lens)
        outs.append(fn(**{**args, "m": args["m"][:n], "a": args["a"][:n], "b": args["b"][:n]},
                       cu_seqlens=cu(lens), state_slots=slots, has_initial_state=init, per_token_state_slots=pts))
        args = {**args, "m": args["m"][n:], "a": args["a"][n:], "b": args["b"][n:]}
    return torch.cat(outs)


@pytest.fixture(autouse=True)
def _plain_references(monkeypatch):
    """The reference composes ops' kernels: keep those the plain-torch ones (padded slots included);
    the fused path switched on (whatever QWEN3NEXT_GDN_FUSED says)."""
    monkeypatch.setattr(gdn_prep, "FUSED", True)
    monkeypatch.setattr(ops, "_use_fast", lambda *t: False)
    monkeypatch.setattr(ops, "_ext_ok", lambda *t: False)
    monkeypatch.setattr(ops, "_use_triton", lambda *t: False)


def _grouped_cols(hk, hv, dk, dv, T):
    """The layer's map: each key head's row block [q dk | k dk | v r dv | z r dv] of in_proj_qkvz
    (16-aligned runs, read in place by the kernels) -> (cols [C], width)."""
    rdv, W = hv // hk * dv, 2 * dk + 2 * hv // hk * dv
    base = torch.arange(hk)[:, None] * W
    cols = torch.cat([(base + torch.arange(dk)).flatten(), (base + dk + torch.arange(dk)).flatten(),
                      (base + 2 * dk + torch.arange(rdv)).flatten()])
    return cols.to(DEV), hk * W


def _check_cached(batches, T, dtype=torch.float32, shape=(2, 4, 16, 32), N=8, tol=1e-5, state_tol=1e-5,
                  rows=slice(None), padded=False, scattered=False):
    """Kernel vs reference over `batches`, the kernels reading m in place from a wider projection
    through a column map (the layer's grouped one, or `scattered`: a random one, gathered first).
    bf16 inputs are checked against the reference on fp32 copies of them. `padded`: some row has
    slot -1, which the torch reference reads as the last slot (Python indexing) and the kernels
    skip: that slot is left out of the comparison and must stay untouched by the kernels."""
    args = _case(T, *shape, K=4, N=N, dtype=dtype, seed=T)
    a_t, a_r = _clone(args), {k: (v.clone().float() if torch.is_tensor(v) else v) for k, v in args.items()}
    C = args["m"].shape[1]
    if scattered:
        cols, width = torch.randperm(C + 7, generator=seeded(T))[:C].to(DEV), C + 7
    else:
        cols, width = _grouped_cols(*shape, T)
    a_t["m"] = torch.zeros(T, width, dtype=dtype, device=DEV)
    a_t["m"][:, cols] = args["m"]
    o_t = _run_cached(functools.partial(gdn_prep.gdn_cached, m_cols=cols), a_t, batches)
    o_r = _run_cached(ref.gdn_cached, a_r, batches)
    assert rel_err(o_t[rows], o_r[rows]) < tol
    n = N - 1 if padded else N
    for name, bound in (("recurrent_state", state_tol), ("conv_state", 1e-6)):  # windows: copied values
        assert rel_err(a_t[name][:n], a_r[name][:n]) < bound
        if padded:
            assert torch.equal(a_t[name][n:], args[name][n:])


def _dev(*xs):
    return [torch.tensor(x, device=DEV) for x in xs]


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("scattered", [False, True])
def test_cached_prefill_chunks_match_reference(fuse, scattered, monkeypatch):
    """Prefill chunks (fresh and continued), varlen, lengths around the 64-token chunk; q / k norms
    in the prep kernel or in the conv's epilogue."""
    monkeypatch.setattr(gdn_prep, "FUSE_QK_NORM", fuse)
    slots, fresh, cont = _dev([5, 0, 3, 1], [False] * 4, [True, True, False, True])
    _check_cached([([63, 1, 65, 5], slots, fresh, None), ([64, 2, 30, 1], slots, cont, None)], T=231,
                  scattered=scattered)


@pytest.mark.parametrize("scattered", [False, True])
def test_verify_matches_reference(scattered):
    """Verify steps: per-token states into scratch slots, a padded row (slot -1), then a second step
    continuing from the first's states."""
    slots, init = _dev([4, 0, -1], [True, False, True])
    pts = torch.tensor([6, 7, -1, 8, 9, 10, -1, -1, -1], device=DEV)
    slots2, init2 = _dev([4, 0], [True, True])
    pts2 = torch.tensor([11, -1, 12, 13], device=DEV)
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 9, 10, 11, 12], device=DEV)
    _check_cached([([3, 3, 3], slots, init, pts), ([2, 2], slots2, init2, pts2)], T=13, N=15, rows=rows,
                  padded=True, scattered=scattered)


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("lens", [[300, 65], [8192]])
def test_cached_prefill_bf16_gpu(lens, fuse, monkeypatch):
    monkeypatch.setattr(gdn_prep, "FUSE_QK_NORM", fuse)
    slots, init = torch.arange(len(lens), device=DEV), torch.ones(len(lens), dtype=torch.bool, device=DEV)
    _check_cached([(lens, slots, init, None)], T=sum(lens), dtype=torch.bfloat16, shape=(16, 32, 128, 128),
                  N=len(lens) + 1, tol=2e-2, state_tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("B,q", [(1, 2), (16, 4)])
def test_verify_bf16_gpu(B, q):
    slots = torch.arange(B, device=DEV)
    init = torch.ones(B, dtype=torch.bool, device=DEV)
    pts = torch.arange(B * q, device=DEV) + B
    _check_cached([([q] * B, slots, init, pts)], T=B * q, dtype=torch.bfloat16, shape=(16, 32, 128, 128),
                  N=B * (q + 1), tol=2e-2, state_tol=1e-2)
