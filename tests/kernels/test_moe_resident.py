"""The expert-resident prefill expert GEMMs (triton/moe_resident.py, moe_grouped's "resident"):
on CPU under the Triton interpreter in float32 against kernels/moe.py, with experts of exactly 0,
1, 63, 64, 65, 128, 129, 192, 193 and 300 rows (one, two or three 64-row sub-tiles; a second table
entry past 192 rows), the branch-per-sub-tile-count and the masked forms, 64- or 128-row first
sub-tiles; on the GPU bitwise against the persistent path at the 80B's expert shapes, T = 8192."""

from __future__ import annotations

import pytest
import torch
import triton

from qwen3next.kernels import moe as ref

from .conftest import DEV, randn, rel_err, seeded

gmm = pytest.importorskip("qwen3next.kernels.triton.moe_grouped")
from qwen3next.kernels.triton import moe_resident as res  # noqa: E402
from qwen3next.kernels.triton import moe_tma  # noqa: E402

_COUNTS = [0, 1, 63, 64, 65, 128, 129, 192, 193, 300]


def _one_config(monkeypatch, arms: bool, pair: bool, bn_up: int = 16, bn_down: int = 16, bk: int = 16):
    """Both kernels with one small config (the interpreter's cost), sub-tiles at their real 64 rows."""
    for kern, hook, bn in ((res._gate_up_resident_kernel, res._set_up_blocks, bn_up),
                           (res._down_resident_kernel, res._set_down_blocks, bn_down)):
        cfg = [triton.Config({"SB": res.SB, "NS": res.NS, "BN": bn, "BK": bk, "CPS": 2, "WS": False, "ARMS": arms,
                              "PAIR": pair},
                             num_warps=4, pre_hook=hook)]
        monkeypatch.setattr(kern, "configs", cfg)
        monkeypatch.setattr(kern, "cache", {})


def test_resident_table():
    """The table at ROWS = 192: one entry per expert up to 192 rows, a second from 193."""
    counts = torch.tensor(_COUNTS, device=DEV)
    tiles = moe_tma.tile_table(counts, sum(_COUNTS), res.ROWS).cpu()
    got = tiles[1:1 + 3 * int(tiles[0])].view(-1, 3).tolist()
    want, start = [], 0
    for e, c in enumerate(_COUNTS):
        want += [[e, start + r, start + c] for r in range(0, c, res.ROWS)]
        start += c
    assert got == want and [r - r0 for _, r0, r in got][-2:] == [300, 108]


@pytest.mark.parametrize("arms,pair", [(True, False), (False, False), (True, True), (False, True)])
def test_resident_at_the_edges(monkeypatch, arms, pair):
    """Experts of exactly _COUNTS rows (top-1 routing, shuffled tokens), partial k and column tiles
    (H = 40, I = 24 under 16-wide tiles), sub-tiles 64 + 64 + 64 or 128 + 64 rows, against the
    reference."""
    _one_config(monkeypatch, arms, pair)
    monkeypatch.setattr(gmm, "RESIDENT_UP", True)  # both GEMMs resident
    gen = seeded(21)
    E, H, I = len(_COUNTS), 40, 24
    ids = torch.repeat_interleave(torch.arange(E), torch.tensor(_COUNTS))
    ids = ids[torch.randperm(ids.numel(), generator=gen)][:, None].to(DEV)  # [T, 1]
    T = ids.shape[0]
    x = randn(T, H, gen=gen)
    gate_up, down = randn(E, 2 * I, H, gen=gen, scale=0.2), randn(E, H, I, gen=gen, scale=0.2)
    w = torch.rand(T, 1, generator=gen).to(DEV)
    y = gmm.moe_experts_sorted(x, gate_up, down, w, ids, gemm="resident")
    assert rel_err(y, ref.moe_experts(x, gate_up, down, w, ids)) < 1e-5


@pytest.mark.parametrize("resident_up", [True, False])
def test_resident_uneven_and_gated(monkeypatch, resident_up):
    """Top-3 routing with uneven counts (three experts without rows), the interpreter's first
    configs as shipped (tiles wider than H and I), gate/up resident or the persistent one, and the
    gated shared-expert fold: bitwise equal to the sum without it plus the MoE block's torch ops."""
    from tests.kernels.test_moe_grouped import _skewed_ids

    monkeypatch.setattr(gmm, "RESIDENT_UP", resident_up)

    gen = seeded(23)
    T, E, H, I, k = 97, 11, 40, 24, 3
    x = randn(T, H, gen=gen)
    gate_up, down = randn(E, 2 * I, H, gen=gen, scale=0.2), randn(E, H, I, gen=gen, scale=0.2)
    ids = _skewed_ids(T, k, E, gen)
    w = torch.rand(T, k, generator=gen).to(DEV)
    sh, g = randn(T, H, gen=gen), randn(T, 1, gen=gen, scale=3.0)
    want = ref.moe_experts(x, gate_up, down, w, ids)
    y = gmm.moe_experts_sorted(x, gate_up, down, w, ids, gemm="resident")
    assert rel_err(y, want) < 1e-5
    yg = gmm.moe_experts_sorted(x, gate_up, down, w, ids, gemm="resident", gated=(sh, g))
    assert rel_err(yg, want + torch.sigmoid(g) * sh) < 1e-5
    assert torch.equal(yg, y + torch.sigmoid(g) * sh)
    with pytest.raises(ValueError, match="tiles"):
        res.gate_up(x, gate_up, torch.zeros(T, dtype=torch.int64, device=DEV), torch.zeros(4, device=DEV))


@pytest.mark.gpu
def test_resident_bitwise_gpu():
    """At T = 8192 (~160 rows an expert), both GEMMs and the whole call equal the persistent path bit
    for bit (same k order, fp32 accumulation)."""
    gen = seeded(8192)
    T, E, H, I, k = 8192, 512, 2048, 512, 10
    x = randn(T, H, gen=gen, dtype=torch.bfloat16)
    gate_up = randn(E, 2 * I, H, gen=gen, dtype=torch.bfloat16, scale=0.02)
    down = randn(E, H, I, gen=gen, dtype=torch.bfloat16, scale=0.02)
    w, ids = ref.moe_route(randn(T, E, gen=gen), k, True)
    _, cnt, _, _, src = gmm.sort_rows(x, ids, E, copy=False)
    tiles, rtiles = moe_tma.tile_table(cnt, T * k), moe_tma.tile_table(cnt, T * k, res.ROWS)
    h = moe_tma.gate_up(x, gate_up, cnt, src, tiles)
    assert torch.equal(res.gate_up(x, gate_up, src, rtiles), h)
    assert torch.equal(res.down(h, down, rtiles), moe_tma.down(h, down, cnt, tiles))
    y = gmm.moe_experts_sorted(x, gate_up, down, w, ids, gemm="resident")
    assert torch.equal(y, gmm.moe_experts_sorted(x, gate_up, down, w, ids, gemm="persistent"))
    assert rel_err(y, ref.moe_experts(x, gate_up, down, w, ids)) < 1e-2
