"""The prefill MoE over expert-sorted rows (triton/moe_grouped.py, GEMMs by torch._grouped_mm or
moe_tma.py) against kernels/moe.py: on CPU in float32 (torch's grouped_mm CPU fallback, the Triton
kernels under the interpreter) with experts that get no rows and uneven counts; in bf16 at the
80B's expert shapes on the GPU."""

from __future__ import annotations

import pytest
import torch
import triton

from qwen3next.kernels import moe as ref

from .conftest import DEV, randn, rel_err, seeded

gmm = pytest.importorskip("qwen3next.kernels.triton.moe_grouped")


def _skewed_ids(T: int, k: int, E: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct experts per token drawn from the first E - 3 only (the last three get no rows;
    so does any the draw misses), weighted so counts are uneven."""
    p = torch.linspace(1.0, 8.0, E - 3)
    return torch.stack([torch.multinomial(p, k, generator=gen) for _ in range(T)]).to(DEV)


def test_sort_rows():
    gen = seeded(7)
    T, H, E, k = 13, 24, 9, 3
    x = randn(T, H, gen=gen)
    ids = _skewed_ids(T, k, E, gen)
    xs, cnt, offs, pos, src = gmm.sort_rows(x, ids, E)
    counts = torch.bincount(ids.reshape(-1).cpu(), minlength=E)
    assert torch.equal(cnt.cpu(), counts) and torch.equal(offs.cpu(), counts.cumsum(0).to(torch.int32))
    assert torch.equal(torch.sort(pos.cpu()).values, torch.arange(T * k))  # a permutation
    starts = (counts.cumsum(0) - counts)[ids.reshape(-1).cpu()]
    assert ((pos.cpu() >= starts) & (pos.cpu() < starts + counts[ids.reshape(-1).cpu()])).all()  # its expert's run
    assert torch.equal(xs[pos], x.repeat_interleave(k, 0)) and torch.equal(x[src], xs)


@pytest.mark.parametrize("gemm", ["torch", "triton", "triton_gather", "gather_torch", "persistent", "persistent_mixed"])
@pytest.mark.parametrize("T,E,H,I,k", [(1, 4, 16, 8, 1), (29, 11, 40, 24, 3), (64, 8, 32, 16, 4)])
def test_sorted_experts(T, E, H, I, k, gemm):
    if gemm in ("torch", "gather_torch") and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    gen = seeded(T + E)
    x = randn(T, H, gen=gen)
    gate_up, down = randn(E, 2 * I, H, gen=gen, scale=0.2), randn(E, H, I, gen=gen, scale=0.2)
    ids = _skewed_ids(T, k, E, gen) if E - 3 >= k else torch.randint(0, E, (T, k), generator=gen).to(DEV)
    w = torch.rand(T, k, generator=gen).to(DEV)
    y = gmm.moe_experts_sorted(x, gate_up, down, w, ids, gemm=gemm)
    assert rel_err(y, ref.moe_experts(x, gate_up, down, w, ids)) < 1e-5


@pytest.mark.parametrize("gemm", ["triton_gather", "persistent", "persistent_mixed"])
def test_gated_add(gemm):
    """gated = (sh, g): + sigmoid(g) * sh in the k-sum's pass, as the MoE block's torch ops add it;
    ops.moe_experts on CPU adds it with those ops."""
    from qwen3next.kernels import ops

    gen = seeded(17)
    T, E, H, I, k = 29, 11, 40, 24, 3
    x = randn(T, H, gen=gen)
    gate_up, down = randn(E, 2 * I, H, gen=gen, scale=0.2), randn(E, H, I, gen=gen, scale=0.2)
    ids = _skewed_ids(T, k, E, gen)
    w = torch.rand(T, k, generator=gen).to(DEV)
    sh, g = randn(T, H, gen=gen), randn(T, 1, gen=gen, scale=3.0)
    want = ref.moe_experts(x, gate_up, down, w, ids) + torch.sigmoid(g) * sh
    y = gmm.moe_experts_sorted(x, gate_up, down, w, ids, gemm=gemm, gated=(sh, g))
    assert rel_err(y, want) < 1e-5
    # the block's torch ops' rounding: bitwise equal to the sum without it plus them
    assert torch.equal(y, gmm.moe_experts_sorted(x, gate_up, down, w, ids, gemm=gemm) + torch.sigmoid(g) * sh)
    assert rel_err(ops.moe_experts(x, gate_up, down, w, ids, gated=(sh, g)), want) < 1e-5


_PTX_OF_GATED_SUM = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from qwen3next.kernels.triton import moe_grouped as gmm
sig = dict(y_ptr="*bf16", pos_ptr="*i64", w_ptr="*fp32", o_ptr="*bf16", sh_ptr="*bf16", s_ptr="*bf16", T="i32",
           H="i32", YS="i32")
src = ASTSource(gmm._unsort_sum_kernel, sig, dict(TOPK=10, BH=1024, GATED=True))
print(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, **gmm.UNSORT_OPTIONS}).asm["ptx"])
"""


def test_gated_add_compiles_without_bf16_fma():
    """On sm_90 Triton narrows the gated add to bf16 arithmetic; with FMA contraction it became one
    fma.rn.bf16 (one rounding, torch's ops round twice), which failed the H200's bit-equality tests.
    Compiles the k-sum kernel as unsort_sum launches it (no GPU needed; in a child process, since
    the interpreter patches triton.language here) and reads the PTX."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _PTX_OF_GATED_SUM], capture_output=True, text=True, env=env,
                         timeout=120)
    if run.returncode:
        pytest.skip(f"cannot compile for sm_90 here: {run.stderr.strip().splitlines()[-1][:100]}")
    assert "mul.rn.bf16" in run.stdout and "add.rn.bf16" in run.stdout  # the product and the add, each rounded
    assert "fma.rn.bf16" not in run.stdout


def test_dispatch_cpu_unchanged(monkeypatch):
    """CPU tensors never take the sorted path (the engine keeps its C++ / torch MoE there), whatever
    the switch says; an unknown switch value is refused."""
    gen = seeded(3)
    x = randn(2048, 16, gen=gen)
    gate_up, down = randn(4, 16, 16, gen=gen), randn(4, 16, 8, gen=gen)
    monkeypatch.setenv("QWEN3NEXT_MOE_SORTED", "torch")
    assert gmm.sorted_gemm(x, gate_up, down, 10**6) is None
    monkeypatch.setenv("QWEN3NEXT_MOE_SORTED", "off")
    assert gmm.sorted_gemm(x, gate_up, down, 10**6) is None
    monkeypatch.setenv("QWEN3NEXT_MOE_SORTED", "bogus")
    with pytest.raises(ValueError, match="QWEN3NEXT_MOE_SORTED='bogus'"):
        gmm.sorted_gemm(x, gate_up, down, 10**6)


@pytest.mark.gpu
@pytest.mark.parametrize("T,gemm", [(512, "torch"), (512, "triton"), (512, "triton_gather"), (2048, "torch"),
                                    (1024, "persistent"), (1024, "gather_torch"),
                                    (4096, "persistent_mixed")])  # (~80 rows an expert: both tile heights)  # (each Triton class tunes)
def test_sorted_bf16_gpu(T, gemm, monkeypatch):
    gen = seeded(T)
    E, H, I, k = 512, 2048, 512, 10
    x = randn(T, H, gen=gen, dtype=torch.bfloat16)
    gate_up = randn(E, 2 * I, H, gen=gen, dtype=torch.bfloat16, scale=0.02)
    down = randn(E, H, I, gen=gen, dtype=torch.bfloat16, scale=0.02)
    w, ids = ref.moe_route(randn(T, E, gen=gen), k, True)
    monkeypatch.setenv("QWEN3NEXT_MOE_SORTED", gemm)
    assert gmm.sorted_gemm(x, gate_up, down, max(T * k, gmm.SORTED_MIN_ROWS)) == gemm
    y = gmm.moe_experts_sorted(x, gate_up, down, w, ids, gemm=gemm)
    want = ref.moe_experts(x, gate_up, down, w, ids)
    assert rel_err(y, want) < 1e-2
    sh, g = randn(T, H, gen=gen, dtype=torch.bfloat16), randn(T, 1, gen=gen, dtype=torch.bfloat16)
    yg = gmm.moe_experts_sorted(x, gate_up, down, w, ids, gemm=gemm, gated=(sh, g))
    assert torch.equal(yg, y + torch.sigmoid(g) * sh)  # the MoE block's torch ops, bit for bit


def test_tile_table():
    """The persistent kernels' table: every PERSIST_BM-row tile of every expert with rows, in expert
    order, its first row and its expert's end row; the count first."""
    from qwen3next.kernels.triton import moe_tma

    BM = moe_tma.PERSIST_BM
    counts = torch.tensor([0, 3 * BM, 1, 0, BM + 5, 0], device=DEV)
    tiles = moe_tma.tile_table(counts, int(counts.sum())).cpu()
    want = [(1, 0, 3 * BM), (1, BM, 3 * BM), (1, 2 * BM, 3 * BM), (2, 3 * BM, 3 * BM + 1),
            (4, 3 * BM + 1, 4 * BM + 6), (4, 4 * BM + 1, 4 * BM + 6)]
    assert int(tiles[0]) == len(want)
    assert tiles[1:1 + 3 * len(want)].view(-1, 3).tolist() == [list(w) for w in want]


@pytest.mark.gpu
def test_auto_dispatch_gpu(monkeypatch):
    """The default ("auto"): the persistent gate/up + resident down from PERSISTENT_MIN_ROWS routed rows,
    triton_gather below."""
    monkeypatch.delenv("QWEN3NEXT_MOE_SORTED", raising=False)
    x = torch.zeros(8, 2048, dtype=torch.bfloat16, device=DEV)
    gate_up, down = torch.zeros(4, 1024, 2048, **_bf), torch.zeros(4, 2048, 512, **_bf)
    assert gmm.sorted_gemm(x, gate_up, down, gmm.PERSISTENT_MIN_ROWS) == "resident"
    assert gmm.sorted_gemm(x, gate_up, down, gmm.PERSISTENT_MIN_ROWS - 1) == "triton_gather"


_bf = {"dtype": torch.bfloat16, "device": DEV}


@pytest.mark.parametrize("gemm", ["triton", "triton_gather", "persistent", "persistent_mixed"])
def test_triton_small_tiles(monkeypatch, gemm):
    """moe_tma's kernels with tiles smaller than every dimension: several row tiles per expert,
    K loops with a partial last tile (zero-filled by the descriptors), partial column tiles whose
    boxes run into the next expert's weights (computed, never stored)."""
    import triton

    from qwen3next.kernels.triton import moe_tma

    cfg = [triton.Config({"BM": 16, "BN": 16, "BK": 16}, num_warps=4, pre_hook=moe_tma._set_blocks)]
    for kern in (moe_tma._gate_up_kernel, moe_tma._down_kernel):
        monkeypatch.setattr(kern, "configs", cfg)
        monkeypatch.setattr(kern, "cache", {})
    # the persistent kernels: 16-row tiles (the table's too), 2 programs per SM-stand-in (8 in all)
    monkeypatch.setattr(moe_tma, "PERSIST_BM", 16)
    pcfg = [triton.Config({**c.kwargs, "CPS": 2, "WS": False}, num_warps=4, pre_hook=moe_tma._set_blocks) for c in cfg]
    for kern in (moe_tma._gate_up_persistent_kernel, moe_tma._down_persistent_kernel):
        monkeypatch.setattr(kern, "configs", pcfg)
        monkeypatch.setattr(kern, "cache", {})
    # the mixed kernels: 32-row tiles, 16-row last tiles
    monkeypatch.setattr(moe_tma, "MIXED_BM", 32)
    for kern, hook in ((moe_tma._gate_up_mixed_kernel, moe_tma._set_b_block),
                       (moe_tma._down_mixed_kernel, moe_tma._set_mixed_blocks)):
        mcfg = [triton.Config({"BM": 32, "BN": 16, "BK": 16, "CPS": 2, "WS": False}, num_warps=4, pre_hook=hook)]
        monkeypatch.setattr(kern, "configs", mcfg)
        monkeypatch.setattr(kern, "cache", {})
    gen = seeded(5)
    T, E, H, I, k = 37, 7, 40, 24, 3
    x = randn(T, H, gen=gen)
    gate_up, down = randn(E, 2 * I, H, gen=gen, scale=0.2), randn(E, H, I, gen=gen, scale=0.2)
    ids = _skewed_ids(T, k, E, gen)
    w = torch.rand(T, k, generator=gen).to(DEV)
    y = gmm.moe_experts_sorted(x, gate_up, down, w, ids, gemm=gemm)
    assert rel_err(y, ref.moe_experts(x, gate_up, down, w, ids)) < 1e-5


# rows per expert around the mixed gate/up's tile heights (128 and 64): none, one, either side of 64
# and 128, and 200 (a 128-row tile and a 72-row one, which is too many for the 64-row shape)
_MIXED_COUNTS = [0, 1, 63, 64, 65, 127, 128, 129, 200]


@pytest.mark.parametrize("mixed_down", [True, False])
def test_mixed_tiles_at_the_edges(monkeypatch, mixed_down):
    """persistent_mixed at its real tile heights with experts of exactly _MIXED_COUNTS rows (top-1
    routing, shuffled tokens): its table (128-row tiles, each expert's last one where the kernels
    pick the 64-row shape iff at most 64 rows are left) and the experts' output against the
    reference, down mixed or the 64-row persistent one; the mixed kernels refuse to run without
    their table."""
    from qwen3next.kernels.triton import moe_tma

    monkeypatch.setattr(gmm, "MIXED_DOWN", mixed_down)

    gen = seeded(11)
    E, H, I = len(_MIXED_COUNTS), 40, 24
    ids = torch.repeat_interleave(torch.arange(E), torch.tensor(_MIXED_COUNTS))
    ids = ids[torch.randperm(ids.numel(), generator=gen)][:, None].to(DEV)  # [T, 1]
    T = ids.shape[0]
    counts = torch.tensor(_MIXED_COUNTS, device=DEV)
    tiles = moe_tma.tile_table(counts, T, moe_tma.MIXED_BM).cpu()
    got = tiles[1:1 + 3 * int(tiles[0])].view(-1, 3).tolist()
    want, start = [], 0
    for e, c in enumerate(_MIXED_COUNTS):
        want += [[e, start + r, start + c] for r in range(0, c, 128)]
        start += c
    assert got == want
    # rows each tile holds (the kernel takes the 64-row shape where <= 64): 129 = 128 + 1, 200 = 128 + 72
    assert [min(rend - row0, 128) for _, row0, rend in got] == [1, 63, 64, 65, 127, 128, 128, 1, 128, 72]
    x = randn(T, H, gen=gen)
    gate_up, down = randn(E, 2 * I, H, gen=gen, scale=0.2), randn(E, H, I, gen=gen, scale=0.2)
    w = torch.rand(T, 1, generator=gen).to(DEV)
    y = gmm.moe_experts_sorted(x, gate_up, down, w, ids, gemm="persistent_mixed")
    assert rel_err(y, ref.moe_experts(x, gate_up, down, w, ids)) < 1e-5
    _, cnt, _, _, src = gmm.sort_rows(x, ids, E, copy=False)
    with pytest.raises(ValueError, match="mixed=True"):
        moe_tma.gate_up(x, gate_up, cnt, src, mixed=True)
    with pytest.raises(ValueError, match="mixed=True"):
        moe_tma.down(torch.zeros(T, I, device=DEV), down, cnt, mixed=True)
