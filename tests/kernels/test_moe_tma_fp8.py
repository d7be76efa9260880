"""The w8a8 prefill experts over expert-sorted rows (triton/moe_tma_fp8.py) against kernels/fp8.py's
references: each GEMM alone and the whole call on CPU (the interpreter, float32, experts with no
rows and uneven counts, H and I multiples of 128), the moe_fp8 dispatch switch, and the 80B's
expert shapes in bf16 on the GPU."""

from __future__ import annotations

import pytest
import torch

from qwen3next.kernels import fp8 as ref
from qwen3next.kernels import moe as ref_moe

from .conftest import DEV, randn, rel_err, seeded

tf8 = pytest.importorskip("qwen3next.kernels.triton.moe_tma_fp8")
from qwen3next.kernels.triton import moe_fp8, moe_grouped  # noqa: E402


def _skewed_ids(T: int, k: int, E: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct experts per token from the first E - 2 only (the last two get no rows), uneven."""
    p = torch.linspace(1.0, 8.0, E - 2)
    return torch.stack([torch.multinomial(p, k, generator=gen) for _ in range(T)]).to(DEV)


def _experts(gen, E, H, I, scale=0.1, dtype=torch.float32):
    gu8, gus = ref.quantize(randn(E, 2 * I, H, gen=gen, dtype=dtype, scale=scale))
    dn8, dns = ref.quantize(randn(E, H, I, gen=gen, dtype=dtype, scale=scale))
    return gu8, gus, dn8, dns


def _sorted(x, ids, E):
    _, counts, _, pos, src = moe_grouped.sort_rows(x, ids, E, copy=False)
    return counts, pos, src


@pytest.fixture
def force_config(monkeypatch):
    """Run a kernel with one given config (the interpreter otherwise takes the first only)."""
    def force(kernel, config):
        monkeypatch.setattr(kernel, "configs", [config])
    return force


@pytest.mark.parametrize("T,E,H,I,k,cfg", [(9, 5, 256, 128, 2, 0), (21, 7, 384, 256, 3, 0), (21, 7, 384, 256, 3, 2),
                                           (9, 5, 256, 128, 2, 3), (150, 5, 128, 256, 2, 0)])
def test_gate_up(T, E, H, I, k, cfg, force_config):
    """h (dequantised) against silu(gate) * up of the dequantised fp8 x and weights, each row at its
    sorted place; the scales are per row and 128 columns; cfg: which of the configs runs."""
    force_config(tf8._gate_up_kernel, tf8._UP_CONFIGS[cfg])
    gen = seeded(T * E)
    x = randn(T, H, gen=gen)
    gu8, gus, _, _ = _experts(gen, E, H, I)
    ids = _skewed_ids(T, k, E, gen)
    counts, pos, src = _sorted(x, ids, E)
    xq, xs = ref.quantize_act(x)
    h8, hs = tf8.gate_up(xq, xs, gu8, gus, counts, src, x.dtype)
    assert h8.dtype == torch.float8_e4m3fn and h8.shape == (T * k, I) and hs.shape == (T * k, I // 128)
    xd = ref.dequantize(xq, xs, (1, 128))
    w = ref.dequantize(gu8, gus)  # [E, 2I, H]
    e_of = ids.reshape(-1)
    gu = torch.einsum("mh,mnh->mn", xd.repeat_interleave(k, 0), w[e_of])  # [T*k, 2I] in assignment order
    want = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
    # h leaves as fp8, quantised per row and 128 columns: compare with want put through the same
    # quantiser (Triton's, which under the interpreter rounds its own way: test_fp8_kernels)
    q_want, s_want = moe_fp8.quantize_act(want)
    torch.testing.assert_close(hs[pos], s_want, rtol=1e-5, atol=0)
    same = (h8[pos].float() == q_want.float()).float().mean()
    assert same > 0.98  # (a value next to a rounding boundary can land one step apart)
    assert rel_err(ref.dequantize(h8, hs, (1, 128))[pos], want) < 0.07


@pytest.mark.parametrize("cfg", range(len(tf8._DOWN_CONFIGS)))
@pytest.mark.parametrize("M,E,H,I", [(17, 4, 256, 128), (40, 6, 128, 384), (300, 4, 128, 128)])
def test_down(M, E, H, I, cfg, force_config):
    """y = dequant(h) dequant(W_down)^T exactly (fp8 products are exact in fp32), with empty experts;
    every config (BN of 64 to 256: one or two weight scale blocks per tile, H = 128 < BN); M = 300:
    experts of 100 and 200 rows, several row tiles each."""
    force_config(tf8._down_kernel, tf8._DOWN_CONFIGS[cfg])
    gen = seeded(M + E)
    h8, hs = ref.quantize_act(randn(M, I, gen=gen))
    _, _, dn8, dns = _experts(gen, E, H, I)
    cnt = torch.tensor([0] * (E - 3) + [M // 3, 0, M - M // 3], device=DEV)
    y = tf8.down(h8, hs, dn8, dns, cnt, torch.float32)
    e_of = torch.repeat_interleave(torch.arange(E, device=DEV), cnt)
    want = torch.einsum("mi,mhi->mh", ref.dequantize(h8, hs, (1, 128)), ref.dequantize(dn8, dns)[e_of])
    assert rel_err(y, want) < 1e-5


def _w8a8_same_quantiser(x, gu8, gus, dn8, dns, w, ids):
    """kernels/fp8.py's w8a8 reference with the activations quantised by moe_fp8.quantize_act (the
    Triton quantiser the kernels use: under the interpreter it rounds some values differently)."""
    I = dn8.shape[-1]

    def act(a):
        return ref.dequantize(*moe_fp8.quantize_act(a), (1, 128))

    def expert(e, xe):
        gu = (act(xe) @ ref.dequantize(gu8[e], gus[e]).t()).to(x.dtype)
        h = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
        return (act(h) @ ref.dequantize(dn8[e], dns[e]).t()).to(x.dtype)

    return ref_moe.moe_experts_by(x, w, ids, gu8.shape[0], expert)


@pytest.mark.parametrize("persistent", ["", "down", "all"])
@pytest.mark.parametrize("T,E,H,I,k", [(1, 4, 128, 128, 1), (29, 9, 384, 256, 3), (64, 6, 256, 128, 4),
                                       (150, 5, 128, 128, 2)])
def test_sorted_fp8(T, E, H, I, k, persistent):
    """(The last: ~100 rows per expert, several row tiles of one expert; persistent: the tile-table
    kernels, 4 programs per SM-stand-in on CPU.)"""
    gen = seeded(T + E)
    x = randn(T, H, gen=gen)
    gu8, gus, dn8, dns = _experts(gen, E, H, I)
    ids = _skewed_ids(T, k, E, gen) if E - 2 >= k else torch.randint(0, E, (T, k), generator=gen).to(DEV)
    w = torch.rand(T, k, generator=gen).to(DEV)
    y = tf8.moe_experts_sorted_fp8(x, gu8, gus, dn8, dns, w, ids, persistent=persistent)
    if persistent:  # the shared expert's gated add in the k-sum's pass
        sh, g = randn(T, H, gen=gen), randn(T, 1, gen=gen)
        yg = tf8.moe_experts_sorted_fp8(x, gu8, gus, dn8, dns, w, ids, persistent=persistent, gated=(sh, g))
        assert torch.equal(yg, y + torch.sigmoid(g) * sh)
    # (h's fp8 rounding can land one step apart where the two fp32 sums straddle a boundary)
    assert rel_err(y, _w8a8_same_quantiser(x, gu8, gus, dn8, dns, w, ids)) < 5e-3
    want = ref.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, act_quant=True)
    assert rel_err(y, want) < (0.2 if DEV == "cpu" else 1e-2)  # (the interpreter's fp8 rounding: above)


def test_rejects_bad_persistent():
    gen = seeded(0)
    x = randn(3, 128, gen=gen)
    gu8, gus, dn8, dns = _experts(gen, 2, 128, 128)
    with pytest.raises(ValueError, match="persistent"):
        tf8.moe_experts_sorted_fp8(x, gu8, gus, dn8, dns, torch.ones(3, 1, device=DEV),
                                   torch.zeros(3, 1, dtype=torch.long, device=DEV), persistent="yes")


def test_rejects_unaligned():
    gen = seeded(0)
    x = randn(3, 192, gen=gen)
    gu8, gus, dn8, dns = _experts(gen, 2, 192, 128)
    with pytest.raises(ValueError, match="hidden_size"):
        tf8.moe_experts_sorted_fp8(x, gu8, gus, dn8, dns, torch.ones(3, 1, device=DEV),
                                   torch.zeros(3, 1, dtype=torch.long, device=DEV))


def test_dispatch_off_cpu(monkeypatch):
    """SORTED_FP8 on: CPU tensors keep the padded grouped GEMM, whatever the row count."""
    if DEV == "cuda":
        pytest.skip("CPU dispatch")
    gen = seeded(5)
    T, E, H, I, k = 8, 4, 128, 128, 4
    x = randn(T, H, gen=gen)
    gu8, gus, dn8, dns = _experts(gen, E, H, I)
    monkeypatch.setattr(tf8, "MIN_ROWS", 1)
    assert not tf8.suits(x, gu8, dn8, (128, 128), T * k)
    called = []
    monkeypatch.setattr(moe_fp8, "SORTED_FP8", True)
    monkeypatch.setattr(tf8, "moe_experts_sorted_fp8", lambda *a, **kw: called.append(1))
    ids = torch.randint(0, E, (T, k), generator=gen).to(DEV)
    y = moe_fp8.moe_experts_fp8(x, gu8, gus, dn8, dns, torch.rand(T, k, generator=gen).to(DEV), ids, gemv=False)
    assert not called and y.shape == (T, H)


def test_dispatch_on(monkeypatch):
    """With the switch on and a call that suits, moe_fp8's entry hands over its arguments in order;
    w8a16 calls (act_quant=False) and calls with a fused shared expert stay on the padded GEMM."""
    gen = seeded(6)
    T, E, H, I, k = 12, 5, 256, 128, 2
    x = randn(T, H, gen=gen)
    gu8, gus, dn8, dns = _experts(gen, E, H, I)
    w, ids = ref_moe.moe_route(randn(T, E, gen=gen), k, True)
    monkeypatch.setattr(moe_fp8, "SORTED_FP8", True)
    monkeypatch.setattr(tf8, "suits", lambda *a: True)
    calls = []
    real = tf8.moe_experts_sorted_fp8
    monkeypatch.setattr(tf8, "moe_experts_sorted_fp8", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    y = moe_fp8.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, gemv=False)
    assert calls == [1] and torch.equal(y, real(x, gu8, gus, dn8, dns, w, ids))
    moe_fp8.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, gemv=False, act_quant=False)
    sh = (*ref.quantize(randn(128, H, gen=gen, scale=0.1)), *ref.quantize(randn(128, H, gen=gen, scale=0.1)),
          *ref.quantize(randn(H, 128, gen=gen, scale=0.1)), randn(1, H, gen=gen, scale=0.1))
    moe_fp8.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, gemv=False, shared=sh)
    assert calls == [1]


@pytest.fixture(scope="module")
def experts_80b():
    """The 80B's routed experts (512 of 2048 x 512) in fp8, drawn on the GPU (1.6 G weights)."""
    E, H, I = 512, 2048, 512
    g = torch.Generator(DEV).manual_seed(11)
    gu8, gus = ref.quantize(torch.randn(E, 2 * I, H, generator=g, device=DEV, dtype=torch.bfloat16) * 0.02)
    dn8, dns = ref.quantize(torch.randn(E, H, I, generator=g, device=DEV, dtype=torch.bfloat16) * 0.02)
    return gu8, gus, dn8, dns


@pytest.mark.gpu
def test_sorted_fp8_gpu(experts_80b, monkeypatch):
    """T = 1024 tokens (10240 routed rows, the sorted path's size), top-10, bf16: the kernels alone
    and through moe_fp8's dispatch, against kernels/fp8.py's w8a8 reference."""
    gen = seeded(11)
    T, E, H, k = 1024, 512, 2048, 10
    gu8, gus, dn8, dns = experts_80b
    x = randn(T, H, gen=gen, dtype=torch.bfloat16)
    w, ids = ref_moe.moe_route(randn(T, E, gen=gen), k, True)
    want = ref.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, act_quant=True)
    y = tf8.moe_experts_sorted_fp8(x, gu8, gus, dn8, dns, w, ids)
    assert rel_err(y, want) < 1e-2
    assert not tf8.suits(x, gu8, dn8, (128, 128), T * k)  # below MIN_ROWS: the padded GEMM wins there
    monkeypatch.setattr(tf8, "MIN_ROWS", T * k)
    assert tf8.suits(x, gu8, dn8, (128, 128), T * k)
    monkeypatch.setattr(moe_fp8, "SORTED_FP8", True)
    called = []
    real = tf8.moe_experts_sorted_fp8
    monkeypatch.setattr(tf8, "moe_experts_sorted_fp8", lambda *a, **kw: called.append(1) or real(*a, **kw))
    y2 = moe_fp8.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids)
    assert called and rel_err(y2, y) < 1e-6  # (rows may sit in other places within an expert)


@pytest.mark.gpu
def test_sorted_fp8_8k_gpu(experts_80b):
    """The prefill's size (T = 8192: ~160 rows per expert, several row tiles each) against the padded
    w8a8 grouped GEMM (block_m forces it)."""
    T, E, H, k = 8192, 512, 2048, 10
    gu8, gus, dn8, dns = experts_80b
    g = torch.Generator(DEV).manual_seed(12)
    x = torch.randn(T, H, generator=g, device=DEV, dtype=torch.bfloat16)
    w, ids = ref_moe.moe_route(torch.randn(T, E, generator=g, device=DEV), k, True)
    y = tf8.moe_experts_sorted_fp8(x, gu8, gus, dn8, dns, w, ids)
    assert rel_err(y, moe_fp8.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, block_m=64)) < 1e-2
    sh, gl = torch.randn(T, H, generator=g, device=DEV, dtype=torch.bfloat16), torch.randn(T, 1, generator=g, device=DEV)
    yg = tf8.moe_experts_sorted_fp8(x, gu8, gus, dn8, dns, w, ids, gated=(sh, gl.bfloat16()))
    assert torch.equal(yg, y + torch.sigmoid(gl.bfloat16()) * sh)  # the MoE block's torch ops, bit for bit
    y = tf8.moe_experts_sorted_fp8(x, gu8, gus, dn8, dns, w, ids, persistent="")
    assert rel_err(y, moe_fp8.moe_experts_fp8(x, gu8, gus, dn8, dns, w, ids, block_m=64)) < 1e-2
    yp = tf8.moe_experts_sorted_fp8(x, gu8, gus, dn8, dns, w, ids, persistent="all")
    assert rel_err(yp, y) < 1e-2  # (configs may step K in 64 or 128: other roundings of h)
