"""GPU model benchmark: Qwen3-Next-80B dimensions on the first 8 layers (6 Gated DeltaNet + 2 gated
attention, hidden 2048, 512 experts top-10 of 512, vocab 151936), random bf16 weights shared by our
model and transformers (+ fla when installed), on one GPU.

    python benchmarks/gpu_model.py --out gpu_model.json [--commit SHA] [--no-hf] [--no-engine]
                                   [--engine-passes N] [--only-engine]

Sections (each writes its results into the JSON as it finishes; a failing one records its error):
  ceilings  device-to-device copy bandwidth (the floor of a memory-bound step)
  prefill   one 8K-token prompt through the cached path (KV + state written), logits of the last
            token; transformers like generate's first step (use_cache, logits_to_keep=1)
  decode    one step (forward + logits) at batch 1, 16, 64, 256 with 1K tokens of context:
            ours by CUDA-graph replay (and eagerly at 1 and 64), transformers at 1, 16, 64
  engine    offline throughput: 256 requests of 1K in / 1K out, greedy, through LLMEngine
  parity    ours vs transformers logits: cache-less prefill of 4 x 256 tokens, then one decode step
            through our CUDA graph against transformers with its cache (relative error, argmax
            agreement)
Medians throughout; floors are bytes / measured copy bandwidth or FLOPs / 700 TFLOP/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time

import torch
from triton.testing import do_bench

from benchmarks.results import Results
from qwen3next.config import ModelConfig
from qwen3next.engine import EngineArgs, LLMEngine
from qwen3next.engine.cuda_graph import CudaGraphRunner
from qwen3next.forward_batch import ForwardBatch, ModelCache
from qwen3next.model import Qwen3NextForCausalLM
from qwen3next.sampling_params import SamplingParams

LAYER_TYPES = (["linear_attention"] * 3 + ["full_attention"]) * 2
DIMS = dict(vocab_size=151936, hidden_size=2048, intermediate_size=5120, num_hidden_layers=8,
            num_attention_heads=16, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
            linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
            linear_conv_kernel_dim=4, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512,
            shared_expert_intermediate_size=512, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
            max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=False,
            layer_types=LAYER_TYPES)
ROPE = {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25}
BS = 16  # KV block size
CTX = 1024  # decode context
PEAK_TFLOPS = 700.0  # measured bf16 matmul rate on this card (docs/benchmarks.md, GPU kernels)
R = Results("gpu_model.json")
RES = R.data


save, section = R.save, R.section


def timed(fn, reps: int, warmup: int = 1) -> float:
    """Median ms of fn(), each call alone on the device (host overhead included)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def graph_replay_ms(step, reps: int = 20, warmup: int = 2) -> float:
    """Median ms of step() captured once in a CUDA graph and replayed: its kernels without launch
    gaps. step runs once on a side stream first (what capture needs); a host sync in it fails."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    ms = timed(g.replay, reps=reps, warmup=warmup)
    del g
    return ms


def top_kernels(fn, n: int = 12) -> list:
    """[(kernel name, us per call of fn)] from the torch profiler over 3 calls."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            rows.append((ev.key[:90], round(t / 3, 1)))
    rows.sort(key=lambda r: -r[1])
    return [("TOTAL", round(sum(r[1] for r in rows), 1))] + rows[:n]


# ---- the models ------------------------------------------------------------------------------
@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """O(1)-scale random weights on the GPU: fan-in scaled matrices, N(0, 1) embeddings, norms near
    their identity, A_log / dt_bias spread so the decays differ per head."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("linear_attn.norm.weight"):
            p.normal_(1.0, 0.1, generator=g)
        elif "norm" in name:
            p.normal_(0.0, 0.1, generator=g)
        elif name.endswith("A_log"):
            p.uniform_(-2.0, 1.0, generator=g)
        elif name.endswith("dt_bias") or name.endswith("embed_tokens.weight"):
            p.normal_(0.0, 1.0, generator=g)
        else:
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)


def build_slice(rope: dict | None = None, **dims) -> Qwen3NextForCausalLM:
    """The 8-layer 80B-dims slice (DIMS entries replaced by `dims`, ROPE by `rope`) in bf16 on the GPU,
    random weights, no transformers copy: built on meta, then randomize_ in place."""
    cfg = ModelConfig.from_hf({"model_type": "qwen3_next", **DIMS, **dims, "rope_parameters": dict(rope or ROPE)})
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = Qwen3NextForCausalLM(cfg, with_mtp=False)
    finally:
        torch.set_default_dtype(torch.float32)
    model.to_empty(device="cuda")
    randomize_(model)
    return model.eval()


def build_models(with_hf: bool):
    """-> (ours, hf or None): one set of bf16 weights on the GPU, shared (ours aliases HF's)."""
    from transformers import Qwen3NextConfig

    hf_cfg = Qwen3NextConfig(rope_parameters=dict(ROPE), **DIMS)
    hf_cfg._attn_implementation = "sdpa"
    from transformers import Qwen3NextForCausalLM as HF

    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            hf = HF(hf_cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    randomize_(hf)
    cfg = ModelConfig.from_hf(hf_cfg.to_dict())
    with torch.device("meta"):
        ours = Qwen3NextForCausalLM(cfg, with_mtp=False)
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False, assign=True)
    if missing:
        raise RuntimeError(f"our model lacks weights for {missing[:5]}")
    RES["weights"] = {"params_B": sum(p.numel() for p in ours.parameters()) / 1e9,
                      "hf_only_tensors": unexpected[:10]}
    return ours.eval(), (hf if with_hf else None)


def make_cache(model, num_slots: int, num_blocks: int) -> ModelCache:
    spec = model.state_spec()
    dt, dev = torch.bfloat16, "cuda"
    return ModelCache(
        kv={i: torch.randn(num_blocks, 2, BS, h, d, dtype=dt, device=dev) for i, (h, d) in spec.kv_layers.items()},
        conv={i: torch.randn(num_slots, *s, dtype=dt, device=dev) for i, s in spec.conv_layers.items()},
        recurrent={i: 0.1 * torch.randn(num_slots, *s, device=dev) for i, s in spec.recurrent_layers.items()},
        block_size=BS)


# ---- floors ----------------------------------------------------------------------------------
def weight_bytes(model) -> tuple[int, int]:
    """(bytes a decode step reads of everything but the routed experts, bytes of one expert)."""
    H, I = DIMS["hidden_size"], DIMS["moe_intermediate_size"]
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)
    return other - DIMS["vocab_size"] * H * 2, 3 * I * H * 2  # the embedding table is gathered, not read


def decode_floor_ms(model, B: int, bw_GBps: float) -> dict:
    other, expert = weight_bytes(model)
    E, k, L = DIMS["num_experts"], DIMS["num_experts_per_tok"], DIMS["num_hidden_layers"]
    distinct = E * (1 - (1 - k / E) ** B)  # expected experts hit per layer, uniform routing
    state = 6 * 32 * 128 * 128 * 4 * 2 * B  # fp32 state read + written, 6 DeltaNet layers
    kv = 2 * (CTX + 1) * 2 * 2 * 256 * 2 * B  # 2 attention layers, K and V, 2 heads of 256, bf16
    total = other + L * distinct * expert + state + kv
    return {"bytes_MB": round(total / 1e6, 1), "experts_per_layer": round(distinct, 1),
            "floor_ms": round(total / bw_GBps / 1e6, 4)}


def prefill_flops(T: int) -> float:
    H, I, k = DIMS["hidden_size"], DIMS["moe_intermediate_size"], DIMS["num_experts_per_tok"]
    gdn = H * (2 * 2048 + 2 * 4096) + H * 64 + 4096 * H  # in_proj_qkvz, in_proj_ba, out_proj
    attn = H * 16 * 256 * 2 + 2 * H * 2 * 256 + 16 * 256 * H
    moe = k * 3 * I * H + 3 * 512 * H + H * 512 + H  # routed, shared, router, shared gate
    dense = 6 * gdn + 2 * attn + 8 * moe
    att = 2 * 2 * 2 * T * T / 2 * 16 * 256  # 2 layers, QK and PV, causal half
    delta = 6 * T * 32 * (4 * 128 * 128 + 2 * 64 * 128 * 2)  # chunked rule, per token per head (rough)
    return 2 * dense * T + att + delta + 2 * H * DIMS["vocab_size"]


def tuned_configs() -> dict:
    """The autotuned kernels' choices so far: {kernel: {key: config}}."""
    from qwen3next.kernels.triton import attention, conv1d, delta_rule, moe

    out = {}
    for mod in (moe, attention, conv1d, delta_rule):
        for name in dir(mod):
            fn = getattr(mod, name)
            cache = getattr(fn, "cache", None)
            if isinstance(cache, dict) and cache:
                out[f"{mod.__name__.rsplit('.', 1)[-1]}.{name}"] = {str(k): str(v) for k, v in cache.items()}
    return out


# ---- sections --------------------------------------------------------------------------------
@section
def ceilings(res):
    n = 1 << 30
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=100, return_mode="median")
    res["copy_bw_GBps"] = round(2 * n / ms / 1e6, 1)
    print(f"copy {res['copy_bw_GBps']} GB/s", flush=True)


@section
def prefill_ours(res, ours):
    T = 8192
    cache = make_cache(ours, 2, T // BS + 1)
    ids = torch.randint(0, DIMS["vocab_size"], (T,), device="cuda")
    pos = torch.arange(T, device="cuda")
    fb = ForwardBatch(cu_seqlens=torch.tensor([0, T], device="cuda"), seq_lens=[T], context_lens=[0], cache=cache,
                      block_tables=torch.arange(T // BS + 1, device="cuda")[None], slot_mapping=torch.arange(T, device="cuda"),
                      state_slots=torch.tensor([0], device="cuda"))

    def step():
        with torch.inference_mode():
            return ours.compute_logits(ours(ids, pos, fb)[-1:])

    res["ours_ms"] = round(timed(step, reps=10, warmup=2), 3)
    res["flops_T"] = round(prefill_flops(T) / 1e12, 2)
    res["floor_ms"] = round(prefill_flops(T) / PEAK_TFLOPS / 1e9, 2)
    print(f"prefill 8K ours {res['ours_ms']} ms (floor {res['floor_ms']})", flush=True)
    res["tuned"] = tuned_configs()
    try:
        res["ours_kernels_us"] = top_kernels(step)
    except Exception as e:  # the profiler is a nice-to-have
        res["profiler_error"] = repr(e)[:300]
    del cache


def decode_setup(ours, B: int, cache: ModelCache, runner: CudaGraphRunner | None):
    """Sequence i of B: blocks i*(CTX/BS+1)..., CTX tokens cached, slot i. -> (tok, pos, batch)."""
    nb = CTX // BS + 1
    dev = "cuda"
    tables = torch.arange(B * nb, device=dev).view(B, nb)
    pos = torch.full((B,), CTX, dtype=torch.long, device=dev)
    slot_mapping = tables[:, CTX // BS] * BS + CTX % BS
    fb = ForwardBatch(cu_seqlens=torch.arange(B + 1, device=dev), seq_lens=[1] * B, context_lens=[CTX] * B,
                      cache=cache, block_tables=tables, slot_mapping=slot_mapping,
                      state_slots=torch.arange(B, device=dev))
    tok = torch.randint(0, DIMS["vocab_size"], (B,), device=dev)
    return tok, pos, fb


@section
def decode_ours(res, ours):
    sizes = [1, 16, 64, 256]
    nb = CTX // BS + 1
    cache = make_cache(ours, 257, 256 * nb)
    runner = CudaGraphRunner(ours, cache, nb, max_batch=256, batch_sizes=sizes)
    t0 = time.time()
    runner.capture()
    res["capture_s"] = round(time.time() - t0, 1)
    bw = RES["ceilings"].get("copy_bw_GBps", 4300.0)
    for B in sizes:
        tok, pos, fb = decode_setup(ours, B, cache, runner)
        with torch.inference_mode():
            runner.run(tok, pos, fb)  # loads the static buffers
        g = runner.graphs[B]
        ms = do_bench(g.replay, warmup=25, rep=200, return_mode="median")
        r = res[f"B{B}"] = {"graph_ms": round(ms, 4), **decode_floor_ms(ours, B, bw)}
        r["tok_per_s"] = round(B / ms * 1e3)
        if B in (1, 64):
            def eager():
                with torch.inference_mode():
                    ours.compute_logits(ours(tok, pos, fb))
            r["eager_ms"] = round(timed(eager, reps=20, warmup=2), 3)
            try:
                r["kernels_us"] = top_kernels(g.replay)
            except Exception as e:
                r["profiler_error"] = repr(e)[:300]
        print(f"decode B={B}: graph {r['graph_ms']} ms, eager {r.get('eager_ms')}, floor {r['floor_ms']}", flush=True)
        res["tuned"] = tuned_configs()
        save()
    del runner, cache


@section
def engine(res, ours, passes: int = 1, num_requests: int = 256, prompt_len: int = 1024, out_len: int = 1024,
           limit_s: float = 120):
    t0 = time.time()
    eng = LLMEngine(ours, EngineArgs(device="cuda", max_num_seqs=256, max_num_batched_tokens=8192,
                                     max_model_len=prompt_len + out_len + 64, gpu_memory_utilization=0.9),
                    eos_token_ids=[])
    res["init_s"] = round(time.time() - t0, 1)
    res["cache_blocks"], res["state_slots"] = eng.cache.plan.num_blocks, eng.cache.plan.num_slots
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    graph_steps = [0]
    if eng.runner.graphs is not None:
        run = eng.runner.graphs.run

        def counted(*a):
            graph_steps[0] += 1
            return run(*a)

        eng.runner.graphs.run = counted
    for p in range(passes):  # a second pass on the same engine shows whether the first paid compiles
        r = res[f"pass{p}"] = {}
        graph_steps[0] = 0
        torch.cuda.synchronize()
        t0 = time.time()
        for i in range(num_requests):
            eng.add_request(f"{p}-{i}", torch.randint(0, DIMS["vocab_size"], (prompt_len,), generator=g).tolist(),
                            params)
        steps = out_tokens = 0
        first_done = None
        while eng.has_unfinished_requests():
            for out in eng.step():
                out_tokens += len(out.outputs[0].token_ids) if out.outputs else 0
                if out.finished and first_done is None:
                    first_done = time.time() - t0
            steps += 1
            if time.time() - t0 > limit_s:
                r["stopped_early"] = True
                for rid in list(eng.requests):
                    eng.abort_request(rid)
                eng.step()
                break
        torch.cuda.synchronize()
        wall = time.time() - t0
        r.update(wall_run_s=round(wall, 2), steps=steps, graph_steps=graph_steps[0], output_tokens=out_tokens,
                 output_tok_per_s=round(out_tokens / wall),
                 total_tok_per_s=round((out_tokens + num_requests * prompt_len) / wall),
                 first_request_done_s=first_done and round(first_done, 2))
        print(f"engine pass {p}: {out_tokens} tokens in {wall:.1f} s = {r['output_tok_per_s']} tok/s, "
              f"{steps} steps", flush=True)
        save()
    del eng


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


@section
def parity(res, ours, hf):
    B, T = 4, 256
    ids = torch.randint(0, DIMS["vocab_size"], (B, T), device="cuda")
    with torch.inference_mode():
        ref = hf(input_ids=ids).logits.float().view(B * T, -1)
        out = ours.compute_logits(ours(ids.view(-1), torch.arange(T, device="cuda").repeat(B),
                                       ForwardBatch.full([T] * B, "cuda")))
        res["prefill_rel_err"] = rel_err(out, ref)
        res["prefill_argmax_agree"] = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
        res["prefill_hf_top1_in_our_top5"] = float((out.topk(5, -1).indices == ref.argmax(-1, keepdim=True))
                                                   .any(-1).float().mean())
        del ref, out
        # cached prefill + one CUDA-graph decode step vs transformers with its cache
        nb = T // BS + 1
        cache = make_cache(ours, B + 1, B * nb)
        tables = torch.arange(B * nb, device="cuda").view(B, nb)
        pos = torch.arange(T, device="cuda").repeat(B)
        fb = ForwardBatch(cu_seqlens=torch.arange(B + 1, device="cuda") * T, seq_lens=[T] * B, context_lens=[0] * B,
                          cache=cache, block_tables=tables,
                          slot_mapping=(tables[:, :T // BS, None] * BS + torch.arange(BS, device="cuda")).reshape(-1),
                          state_slots=torch.arange(B, device="cuda"))
        last = ours.compute_logits(ours(ids.view(-1), pos, fb).view(B, T, -1)[:, -1])
        hf_out = hf(input_ids=ids, use_cache=True)
        hf_last = hf_out.logits[:, -1].float()
        res["cached_prefill_last_rel_err"] = rel_err(last, hf_last)
        tok = hf_last.argmax(-1)
        runner = CudaGraphRunner(ours, cache, nb, max_batch=8, batch_sizes=[8])
        runner.capture()
        dfb = ForwardBatch(cu_seqlens=torch.arange(B + 1, device="cuda"), seq_lens=[1] * B, context_lens=[T] * B,
                           cache=cache, block_tables=tables, slot_mapping=tables[:, T // BS] * BS,
                           state_slots=torch.arange(B, device="cuda"))
        dec = runner.run(tok, torch.full((B,), T, device="cuda"), dfb).clone()
        hf_dec = hf(input_ids=tok[:, None], past_key_values=hf_out.past_key_values, use_cache=True).logits[:, -1].float()
        res["decode_rel_err"] = rel_err(dec, hf_dec)
        res["decode_argmax_agree"] = float((dec.argmax(-1) == hf_dec.argmax(-1)).float().mean())
    print({k: v for k, v in res.items() if k != "wall_s"}, flush=True)
    del runner, cache


@section
def prefill_hf(res, hf):
    ids = torch.randint(0, DIMS["vocab_size"], (1, 8192), device="cuda")

    def step():
        with torch.inference_mode():
            return hf(input_ids=ids, use_cache=True, logits_to_keep=1).logits

    res["hf_ms"] = round(timed(step, reps=5, warmup=2), 3)
    print(f"prefill 8K transformers {res['hf_ms']} ms", flush=True)


@section
def decode_hf(res, hf, sizes):
    for B in sizes:
        with torch.inference_mode():
            ids = torch.randint(0, DIMS["vocab_size"], (B, CTX), device="cuda")
            out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
            pkv = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            ts = []
            for i in range(9):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = hf(input_ids=tok, past_key_values=pkv, use_cache=True, logits_to_keep=1)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                if i:  # the first step compiles
                    ts.append((time.perf_counter() - t0) * 1e3)
            res[f"B{B}_ms"] = round(statistics.median(ts), 3)
            print(f"decode transformers B={B}: {res[f'B{B}_ms']} ms", flush=True)
            del out, pkv
        save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=R.path)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (parity and its timings)")
    ap.add_argument("--no-engine", action="store_true", help="skip the offline engine throughput")
    ap.add_argument("--engine-passes", type=int, default=1, help="offline workload runs on one engine")
    ap.add_argument("--only-engine", action="store_true", help="build the models, run the engine section only")
    a = ap.parse_args()
    R.path = a.out
    import triton

    RES["env"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "python": platform.python_version(), "commit": a.commit,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import transformers

        RES["env"]["transformers"] = transformers.__version__
        import fla

        RES["env"]["fla"] = getattr(fla, "__version__", "?")
    except ImportError as e:
        RES["env"]["import_error"] = repr(e)
    save()
    t0 = time.time()
    ours, hf = build_models(with_hf=not a.no_hf)
    RES["build_s"] = round(time.time() - t0, 1)
    if a.only_engine:
        engine(ours, passes=a.engine_passes)
        return
    ceilings()
    prefill_ours(ours)
    decode_ours(ours)
    gc.collect()
    torch.cuda.empty_cache()
    if hf is not None:
        parity(ours, hf)
        gc.collect()
        torch.cuda.empty_cache()
        prefill_hf(hf)
        decode_hf(hf, (1, 16))
    if not a.no_engine:
        engine(ours, passes=a.engine_passes)
        gc.collect()
        torch.cuda.empty_cache()
    if hf is not None:
        decode_hf(hf, (64,))
    save()
    print(json.dumps({k: v for k, v in RES.items()}, indent=1)[:6000])


if __name__ == "__main__":
    main()
