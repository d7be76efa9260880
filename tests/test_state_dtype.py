"""--mamba-ssm-cache-dtype / EngineArgs.mamba_ssm_cache_dtype: the DeltaNet recurrent state pool in
bf16 (or fp16) on the tiny checkpoint (CPU, float32 model). The engine generates with logprobs
close to the float32 pool's on every CPU path (C++ kernel through an fp32 copy of the slots, the
batched torch variants, the references), the cache plan counts the narrow pool's bytes (a budget
too small for fp32 states fits), prefix-caching snapshots and MTP scratch slots live in the same
narrow pool, and a bad value is a one-line error in EngineArgs, LLM(...) and the CLI."""

from __future__ import annotations

import pytest
import torch

from qwen3next.engine import EngineArgs, LLMEngine
from qwen3next.engine.cache import bytes_per_block, bytes_per_slot
from qwen3next.kernels import cpu_ext
from qwen3next.loader import load_model
from qwen3next.sampling_params import SamplingParams

LENGTHS = (200, 37, 90)
PARAMS = SamplingParams(max_tokens=12, temperature=0, prompt_logprobs=0, logprobs=0)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    m, _ = load_model(tiny_ckpt, dtype=torch.float32, device="cpu", with_mtp=True, progress=False)
    return m


@pytest.fixture(scope="module")
def prompts(model):
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]


def make_engine(model, state: str, k: int | None = None, **knobs) -> LLMEngine:
    # 32-token prefill chunks: the state goes through the pool (rounded) between chunks
    knobs = {"max_model_len": 320, "max_num_batched_tokens": 32, **knobs}
    spec = {"method": "qwen3_next_mtp", "num_speculative_tokens": k} if k else None
    return LLMEngine(model, EngineArgs(mamba_ssm_cache_dtype=state, speculative_config=spec, **knobs),
                     eos_token_ids=[])


def generate(engine: LLMEngine, prompts, params=PARAMS) -> list[dict]:
    """All prompts at once (decode steps batch them) -> per request: prompt logprobs [n-1], sampled
    tokens, their logprobs, cached prompt tokens."""
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    got = {str(i): {"tokens": [], "lps": []} for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            r = got[out.request_id]
            if out.prompt_logprobs:
                r["prompt"] = torch.tensor([next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]])
            r["cached"] = out.num_cached_tokens
            c = out.outputs[0]
            r["tokens"] += c.token_ids
            r["lps"] += [next(iter(d.values())).logprob for d in c.logprobs or []]
    return [got[str(i)] for i in range(len(prompts))]


def assert_close(ref: list[dict], got: list[dict]) -> None:
    """Teacher-forced prompt logprobs within bf16 state rounding; greedy tokens agree (a near-tie
    may flip late), their logprobs close while they agree."""
    for r, g in zip(ref, got):
        d = (r["prompt"] - g["prompt"]).abs()
        assert float(d.max()) < 0.15 and float(d.mean()) < 0.01, (float(d.max()), float(d.mean()))
        same = next((i for i, (a, b) in enumerate(zip(r["tokens"], g["tokens"])) if a != b), len(r["tokens"]))
        assert same >= 6, (r["tokens"], g["tokens"])
        assert max(abs(a - b) for a, b in zip(r["lps"][:same], g["lps"][:same])) < 0.05


def pools(engine: LLMEngine) -> set[torch.dtype]:
    return {t.dtype for t in engine.cache.cache.recurrent.values()}


@pytest.fixture(scope="module")
def fp32_out(model, prompts):
    return generate(make_engine(model, "auto"), prompts)


@pytest.mark.parametrize("path,state", [("cpp", "bfloat16"), ("cpp", "float16"), ("fast", "bfloat16"),
                                        ("torch", "bfloat16")])
def test_narrow_state_generates_close_to_fp32(model, prompts, fp32_out, path, state, monkeypatch):
    calls = []
    if path == "cpp":
        if cpu_ext.get() is None:
            pytest.skip("C++ CPU kernels not built here")
        real = cpu_ext._gdn_narrow_pool
        monkeypatch.setattr(cpu_ext, "_gdn_narrow_pool", lambda *a: calls.append(1) or real(*a))
    else:
        monkeypatch.setenv(*(("QWEN3NEXT_CPU_EXT", "0") if path == "fast" else ("QWEN3NEXT_KERNELS", "torch")))
    eng = make_engine(model, state)
    assert pools(eng) == {getattr(torch, state)} and eng.cache.plan.state_dtype == getattr(torch, state)
    got = generate(eng, prompts)
    assert_close(fp32_out, got)
    assert not torch.equal(got[0]["prompt"], fp32_out[0]["prompt"])  # the states really were rounded
    assert bool(calls) == (path == "cpp")


def test_auto_and_float32_keep_fp32_states(model, prompts, fp32_out):
    eng = make_engine(model, "float32")
    assert pools(eng) == {torch.float32} and EngineArgs().state_dtype() == torch.float32
    got = generate(eng, prompts)
    assert all(torch.equal(a["prompt"], b["prompt"]) and a["tokens"] == b["tokens"] for a, b in zip(got, fp32_out))


def test_plan_counts_the_narrow_pool(model):
    """bf16 states take half the recurrent bytes, and the plan (and allocation) say so: 8 slots
    that do not fit a budget with fp32 states fit with bf16 ones."""
    spec, f32, bf16 = model.state_spec(), torch.float32, torch.bfloat16
    rec = sum(h * dk * dv for h, dk, dv in spec.recurrent_layers.values())
    assert bytes_per_slot(spec, f32) - bytes_per_slot(spec, f32, bf16) == 2 * rec
    budget = 8 * bytes_per_slot(spec, f32, bf16) + 2 * bytes_per_block(spec, 16, f32)
    with pytest.raises(ValueError, match="too small"):
        make_engine(model, "auto", max_num_seqs=8, kv_cache_memory_bytes=budget)
    eng = make_engine(model, "bfloat16", max_num_seqs=8, kv_cache_memory_bytes=budget)
    plan, cache = eng.cache.plan, eng.cache.cache
    assert (plan.num_slots, plan.num_blocks, plan.state_dtype) == (8, 2, bf16)
    held = sum(t.numel() * t.element_size() for t in (*cache.kv.values(), *cache.conv.values(),
                                                       *cache.recurrent.values()))
    assert held == plan.total_bytes <= budget


def test_bad_values_are_one_line_errors(tiny_ckpt):
    from qwen3next.api.engine_setup import ENGINE_FIELDS
    from qwen3next.cli import build_parser
    from qwen3next.llm import LLM

    for bad in ("fp8", "bf16", None, torch.bfloat16):
        with pytest.raises(ValueError, match="^mamba_ssm_cache_dtype must be 'auto', 'float32', 'bfloat16'"):
            EngineArgs(mamba_ssm_cache_dtype=bad)
    with pytest.raises(ValueError, match="mamba_ssm_cache_dtype"):
        LLM(tiny_ckpt, mamba_ssm_cache_dtype="int8")
    ns = build_parser().parse_args(["serve", "--mamba-ssm-cache-dtype", "bfloat16"])
    assert ns.mamba_ssm_cache_dtype == "bfloat16" and "mamba_ssm_cache_dtype" in ENGINE_FIELDS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--mamba-ssm-cache-dtype", "fp8"])


def test_llm_kwarg(tiny_ckpt):
    from qwen3next.llm import LLM

    llm = LLM(tiny_ckpt, mamba_ssm_cache_dtype="bfloat16", max_model_len=128, max_num_seqs=4,
              kv_cache_memory_bytes=1 << 22)
    assert pools(llm.llm_engine) == {torch.bfloat16}
    out = llm.generate({"prompt_token_ids": list(range(5, 45))}, SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 4


def test_prefix_caching_snapshots_in_the_narrow_pool(model, prompts):
    """A repeated prompt restores the bf16 snapshot at its last boundary: the same state the first
    run went on from, so the same logprobs, bit for bit."""
    eng = make_engine(model, "bfloat16", enable_prefix_caching=True, prefix_caching_state_block=64)
    assert eng.cache.plan.num_snapshot_slots > 0 and pools(eng) == {torch.bfloat16}
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=0)  # (prompt logprobs bypass the cache)
    first = generate(eng, prompts[:1], params)[0]
    again = generate(eng, prompts[:1], params)[0]
    assert again["cached"] == 192 and first["cached"] == 0
    assert again["tokens"] == first["tokens"] and again["lps"] == first["lps"]


def test_mtp_with_narrow_state(model, prompts, fp32_out):
    """MTP verify keeps each position's state in bf16 scratch slots (the same pool); rejected drafts
    roll back to them. The tokens and logprobs stay close to the fp32 plain engine's."""
    eng = make_engine(model, "bfloat16", k=2)
    assert eng.cache.scratch_base < eng.cache.plan.num_slots and pools(eng) == {torch.bfloat16}
    got = generate(eng, prompts)
    assert_close(fp32_out, got)


def _gdn_case(lens, N, seed, hk=2, hv=4, dk=16, dv=16, K=4):
    g = torch.Generator().manual_seed(seed)
    T, C = sum(lens), 2 * hk * dk + hv * dv
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    return dict(m=r(T, C), a=r(T, hv), b=r(T, hv), conv_weight=r(C, K, scale=0.5), conv_state=r(N, C, K - 1),
                recurrent_state=r(N, hv, dk, dv, scale=0.1).to(torch.bfloat16), A_log=r(hv, scale=0.5),
                dt_bias=r(hv), num_k_heads=hk)


@pytest.mark.parametrize("path,verify", [("cpp", False), ("cpp", True), ("fast", False), ("fast", True),
                                         ("fast_decode", False)])
def test_cpu_kernels_on_a_scattered_narrow_pool(path, verify, monkeypatch):
    """The CPU DeltaNet paths on a bf16 pool with scattered slots (and scattered per-token slots)
    against the reference on the same pool: fp32 math, each stored state rounded once, other
    slots untouched, the conv pool written at the right slots."""
    from qwen3next.kernels import gdn, ops

    if path == "cpp" and cpu_ext.get() is None:
        pytest.skip("C++ CPU kernels not built here")
    lens = [3, 1, 2] if verify else [1, 1, 1]
    T, N = sum(lens), 16
    args = _gdn_case(lens, N, seed=len(path) + 7 * verify)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    slots = torch.tensor([9, 2, 6])
    pts = torch.tensor([12, -1, 4, 14, 0, 11]) if verify else None
    kw = dict(cu_seqlens=cu, state_slots=slots, has_initial_state=torch.tensor([True, True, True]),
              per_token_state_slots=pts)
    got, want = ({k: v.clone() if torch.is_tensor(v) else v for k, v in args.items()} for _ in range(2))
    monkeypatch.setattr(ops, "_ext_ok", lambda *t: path == "cpp")
    if path == "cpp":
        o = cpu_ext.gdn_varlen(**got, **kw)
    elif path == "fast":
        o = ops.gdn_cached(**got, **kw)
    else:
        o = ops.gdn_decode(**{k: v for k, v in got.items()}, state_slots=slots)
    monkeypatch.setattr(ops, "_use_fast", lambda *t: False)
    o_ref = gdn.gdn_cached(**want, **kw)
    assert float((o - o_ref).norm() / o_ref.norm()) < 1e-5
    touched = torch.cat([slots, pts[pts >= 0]]) if verify else slots
    rest = torch.tensor([s for s in range(N) if s not in set(touched.tolist())])
    S, S_ref = got["recurrent_state"], want["recurrent_state"]
    assert S.dtype == torch.bfloat16
    assert float((S[touched].float() - S_ref[touched].float()).norm() / S_ref[touched].float().norm()) < 1e-2
    assert not torch.equal(S[slots], args["recurrent_state"][slots])
    assert torch.equal(S[rest], args["recurrent_state"][rest])
    torch.testing.assert_close(got["conv_state"], want["conv_state"], rtol=1e-6, atol=1e-6)


def test_tensor_parallel_workers_take_the_pool_dtype(tiny_ckpt, prompts):
    """Two ranks: the worker allocates its heads' states from the plan, in bf16 too. Its logprobs
    match one rank's bf16 run far closer than bf16 rounding moves them (a worker left in fp32
    would round only half the heads)."""
    from qwen3next.llm import LLM

    knobs = dict(dtype="float32", device="cpu", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=24,
                 skip_tokenizer_init=True)
    params = SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=0)
    batch = [{"prompt_token_ids": [t % 256 for t in p[:80]]} for p in prompts]  # (ids the tokenizer has)

    def lps(llm):
        outs = llm.generate(batch, params)
        return torch.tensor([next(iter(d.values())).logprob for o in outs for d in o.prompt_logprobs[1:]])

    one32 = lps(LLM(tiny_ckpt, **knobs))
    one16 = lps(LLM(tiny_ckpt, mamba_ssm_cache_dtype="bfloat16", **knobs))
    llm = LLM(tiny_ckpt, tensor_parallel_size=2, mamba_ssm_cache_dtype="bfloat16", **knobs)
    try:
        assert llm.llm_engine.cache.plan.state_dtype == torch.bfloat16
        two16 = lps(llm)
    finally:
        llm.llm_engine.shutdown()
    rounding = float((one16 - one32).abs().max())
    assert rounding > 1e-3
    assert float((two16 - one16).abs().max()) < rounding / 5
