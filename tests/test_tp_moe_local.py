"""Expert parallelism's two local paths agree: decode-sized CUDA batches weigh other ranks' choices
0 on local expert 0 (fixed shapes, so CUDA graphs can capture it: the first real NCCL run failed
at capture on torch.nonzero), the rest gather the rows routed here."""

from __future__ import annotations

import pytest
import torch

from qwen3next.distributed import parallel_state
from qwen3next.kernels import moe as ref_moe
from qwen3next.layers import moe


@pytest.mark.parametrize("rank", [0, 1])
def test_masked_local_experts_equal_gathered_rows(monkeypatch, rank):
    E, H, I, T, k = 8, 32, 16, 12, 3
    monkeypatch.setattr(parallel_state, "_STATE", parallel_state.TPState(rank, 2, torch.device("cpu"), None, None))
    ex = moe.Experts(E, H, I)
    monkeypatch.setattr(parallel_state, "_STATE", None)
    assert ex.num_experts == E // 2 and ex.first_expert == rank * E // 2
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, H**-0.5, generator=g)
        ex.down_proj.normal_(0, I**-0.5, generator=g)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[0] = torch.arange(k) + (E // 2 if rank == 0 else 0)  # a token with no choice on this rank
    weights = torch.rand(T, k, generator=g)
    with torch.no_grad():
        gathered = ex._forward_local(x, weights, ids)  # (CPU: always the gathered rows)
        # the GPU kernels' contract: each (token, choice) on its own, as the reference computes it
        monkeypatch.setattr(moe.ops, "moe_experts", ref_moe.moe_experts)
        masked = ex._forward_masked(x, weights, ids)
    assert masked.abs().sum() > 0 and masked[0].abs().max() == 0
    torch.testing.assert_close(masked, gathered, rtol=1e-5, atol=1e-6)
