"""CUDA runner pieces that need no GPU: the captured batch sizes, the CPU engine staying eager, and
the kernel behaviour graph padding relies on (under Triton's interpreter on CPU): a padded row
(state slot -1) gets a zero DeltaNet output and touches no state, and NaN router logits (garbage
in a padded row) still give valid expert ids."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before any kernel module is imported (as tests/kernels/conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qwen3next.engine import EngineArgs, LLMEngine  # noqa: E402
from qwen3next.engine.cuda_graph import graph_batch_sizes  # noqa: E402
from qwen3next.loader import load_model  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_graph_batch_sizes_cover_every_batch_up_to_the_max():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    sizes = graph_batch_sizes(100)
    assert sizes[-1] == 100 and all(any(s >= b for s in sizes) for b in range(1, 101))


def test_cpu_engine_runs_without_graphs(tiny_ckpt):
    model, _ = load_model(tiny_ckpt, dtype=torch.float32, device="cpu", with_mtp=False, progress=False)
    engine = LLMEngine(model, EngineArgs(device="cpu", max_model_len=64, max_num_seqs=2), eos_token_ids=[])
    assert engine.runner.graphs is None and EngineArgs().enforce_eager is False


def test_padded_row_gets_zero_output_and_touches_no_state():
    pytest.importorskip("triton")
    from qwen3next.kernels.triton.gdn_decode import gdn_decode

    g = torch.Generator().manual_seed(0)
    HK, HV, D, K, N = 2, 4, 16, 4, 3
    C = 2 * HK * D + HV * D
    conv = torch.randn(N, C, K - 1, generator=g).to(DEV)
    rec = torch.randn(N, HV, D, D, generator=g).to(DEV)
    conv0, rec0 = conv.clone(), rec.clone()
    m, a, b = (torch.randn(2, n, generator=g).to(DEV) for n in (C, HV, HV))
    o = gdn_decode(m, a, b, torch.randn(C, K, generator=g).to(DEV), conv, rec, torch.tensor([-1, 1], device=DEV),
                   torch.zeros(HV, device=DEV), torch.ones(HV, device=DEV), HK)
    assert torch.equal(o[0], torch.zeros_like(o[0])) and o[1].abs().sum() > 0
    for t, t0 in ((conv, conv0), (rec, rec0)):
        assert torch.equal(t[[0, 2]], t0[[0, 2]]) and not torch.equal(t[1], t0[1])


def test_nan_router_logits_give_valid_expert_ids():
    pytest.importorskip("triton")
    from qwen3next.kernels.triton.moe import moe_route

    logits = torch.randn(3, 8).to(DEV)
    logits[1] = float("nan")
    _, ids = moe_route(logits, 2, True)
    assert bool(((ids >= 0) & (ids < 8)).all())
