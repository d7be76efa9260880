"""GPU FP8 benchmark: the 80B dimensions on 8 layers (as benchmarks/gpu_model.py builds them,
random bf16 weights), once in bf16 and once quantised to block-FP8 at load (layers/quant.py's
to_fp8_, what `quantization="fp8"` does with a bf16 checkpoint), on one GPU, in the same run.

    python benchmarks/gpu_fp8.py --out gpu_fp8.json [--commit SHA] [--sizes 1,16,64] [--no-prefill]
                                 [--no-accuracy] [--no-prev] [--w8a16] [--prefill-only] [--quick]
    PYTHONPATH=.:/tmp/tri36 python benchmarks/gpu_fp8.py --check-compile   # no GPU: sm_90 compiles

Sections in this order (each writes its results into the JSON as it finishes; a failing one
records its error; the run can be cut at any point and keep what finished):
  memory    parameter bytes and allocated GPU memory of each model
  decode    one step (forward + logits) at B = 1, 16, 64 with 1K tokens of context, by CUDA-graph
            replay: fp8 (as shipped), bf16; floors from the bytes each model must read / measured
            copy bandwidth; kernel tables at B = 1 and 64
  prefill   one 8K-token prompt through the cached path, logits of the last token: bf16, then fp8
            with each prefill dispatch in one process -- moe_fp8.SORTED_FP8 (w8a8 experts over
            expert-sorted rows, moe_tma_fp8.py) off / on x linear_fp8.DENSE_A8 (w8a8 projections)
            off / on where that switch exists -- each with the relative error of its logits on the
            prompt's last PREFILL_ROWS rows vs bf16's and vs "fp8"'s (both off: the default
            dispatch)
  experts   one MoE layer's routed experts alone (layer 0's weights of each model, random routing) at
            T = 8192 and 2048: fp8 w8a8 with SORTED_FP8 off / on, bf16 (ms, TFLOP/s, relative
            error of each fp8 output vs the bf16 one and of sorted vs off; fp8 kernel tables at 8192)
  accuracy  logits of fp8 vs bf16, and vs `deq`: the bf16 model holding the dequantised fp8 weights
            (so fp8 vs deq is the kernels' own error, deq vs bf16 the weights' rounding):
            cache-less prefill of 4 x 512 tokens and one eager decode step at B = 64 from identical
            caches (relative error, argmax agreement)
  decode    fp8_prev: session 3's dispatch for comparison (the w8a16 GEMM for every few-row
            projection, the shared expert as three of them); --w8a16: w8a16 grouped experts
Medians throughout. --prefill-only: memory, prefill and experts alone (the quick A/B).
"""

from __future__ import annotations

import argparse
import gc
import platform
import time
import traceback

import torch
from triton.testing import do_bench

from benchmarks.gpu_model import BS, CTX, DIMS, ROPE, decode_setup, make_cache, randomize_, rel_err, timed, top_kernels
from benchmarks.results import Results
from qwen3next.config import ModelConfig
from qwen3next.engine.cuda_graph import CudaGraphRunner
from qwen3next.forward_batch import ForwardBatch
from qwen3next.kernels import fp8 as qfp8
from qwen3next.kernels import ops
from qwen3next.kernels.moe import moe_route
from qwen3next.kernels.triton import linear_fp8, moe_fp8
from qwen3next.layers import quant
from qwen3next.layers.quant import to_fp8_
from qwen3next.model import Qwen3NextForCausalLM

R = Results("gpu_fp8.json")
RES = R.data
PREFILL_ROWS = 256  # prefill logits compared on the prompt's last rows
PREFILL_REF: dict = {}  # bf16's and fp8's prefill logits, for the variants' errors


save, section = R.save, R.section


def build(fp8: bool) -> Qwen3NextForCausalLM:
    """The 8-layer slice, random weights from seed 0 (the same values for both models), then for
    fp8 §10's projections and the routed experts quantised to 128x128 block-FP8 in place."""
    cfg = ModelConfig.from_hf({**DIMS, "model_type": "qwen3_next", "rope_parameters": dict(ROPE)})
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(cfg, with_mtp=False)
    model = model.to(torch.bfloat16).to_empty(device="cuda")
    randomize_(model, seed=0)
    if fp8:
        to_fp8_(model, (128, 128))
    torch.cuda.synchronize()
    return model.eval()


@torch.no_grad()
def dequantised_copy(fp8) -> Qwen3NextForCausalLM:
    """The bf16 model with every fp8 weight of `fp8` replaced by its dequantised value."""
    deq = build(False)
    for name, p in fp8.named_parameters():
        if p.dtype == qfp8.FP8:
            w = deq.get_parameter(name)
            scale = fp8.get_parameter(name + "_scale_inv")
            for e in range(w.shape[0]) if w.dim() == 3 else (None,):  # experts one at a time
                if e is None:
                    w.copy_(qfp8.dequantize(p, scale, dtype=w.dtype))
                else:
                    w[e].copy_(qfp8.dequantize(p[e], scale[e], dtype=w.dtype))
    return deq


def param_bytes(model, experts: bool | None = None) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if experts is None or (".experts." in n) == experts)


def floor_ms(model, B: int, bw_GBps: float) -> dict:
    """Bytes one decode step must read (weights but the embedding table, the distinct experts
    uniform routing touches, states, KV) / bandwidth."""
    E, k, L = DIMS["num_experts"], DIMS["num_experts_per_tok"], DIMS["num_hidden_layers"]
    other = param_bytes(model, experts=False) - DIMS["vocab_size"] * DIMS["hidden_size"] * 2
    per_expert = param_bytes(model, experts=True) / (E * L)
    distinct = E * (1 - (1 - k / E) ** B)
    state = 6 * 32 * 128 * 128 * 4 * 2 * B
    kv = 2 * (CTX + 1) * 2 * 2 * 256 * 2 * B
    total = other + L * distinct * per_expert + state + kv
    return {"bytes_MB": round(total / 1e6, 1), "floor_ms": round(total / bw_GBps / 1e6, 4)}


@section
def memory(res, name: str, model, alloc_before: int):
    res[name] = {"params_GB": round(param_bytes(model) / 1e9, 3),
                 "experts_GB": round(param_bytes(model, experts=True) / 1e9, 3),
                 "allocated_GB": round((torch.cuda.memory_allocated() - alloc_before) / 1e9, 3)}
    print(name, res[name], flush=True)


@section
def ceilings(res):
    n = 1 << 30
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=100, return_mode="median")
    res["copy_bw_GBps"] = round(2 * n / ms / 1e6, 1)


def logits_pair(model, B: int = 4, T: int = 512, Bd: int = 64):
    """-> (cache-less prefill logits [B*T, V], one eager decode step's logits [Bd, V]), fixed inputs."""
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, DIMS["vocab_size"], (B * T,), device="cuda", generator=g)
    pos = torch.arange(T, device="cuda").repeat(B)
    with torch.inference_mode():
        pre = model.compute_logits(model(ids, pos, ForwardBatch.full([T] * B, "cuda")))
        torch.manual_seed(2)
        cache = make_cache(model, Bd + 1, Bd * (CTX // BS + 1))
        torch.manual_seed(3)
        tok, p, fb = decode_setup(model, Bd, cache, None)
        dec = model.compute_logits(model(tok, p, fb))
    return pre, dec


def compare(a, b) -> dict:
    return {"rel_err": round(rel_err(a, b), 5), "argmax_agree": round(float((a.argmax(-1) == b.argmax(-1))
                                                                           .float().mean()), 4)}


@section
def accuracy(res, models: dict):
    out = {name: logits_pair(models[name]) for name in ("bf16", "deq", "fp8")}
    for a, b in (("fp8", "bf16"), ("deq", "bf16"), ("fp8", "deq")):
        res[f"{a}_vs_{b}"] = {"prefill": compare(out[a][0], out[b][0]), "decode_B64": compare(out[a][1], out[b][1])}
    print({k: v for k, v in res.items() if k != "wall_s"}, flush=True)


class dispatch:
    """Context: the fp8 paths of session 3 (`prev`: the 16-row w8a16 GEMM for every few-row
    projection, no GEMV / skinny GEMM, no fused shared expert) and / or w8a16 grouped experts, and
    / or other module switches ({(module, name): value}), restored on exit."""

    def __init__(self, prev: bool = False, w8a16: bool = False, switches: dict | None = None):
        self.set = {(linear_fp8, "GEMV_M"): 0, (linear_fp8, "SKINNY_M"): 0,
                    (quant, "FUSED_SHARED_MAX_ROWS"): 0} if prev else {}
        if w8a16:
            self.set[(moe_fp8, "ACT_QUANT")] = False
        self.set.update(switches or {})

    def __enter__(self):
        self.old = {k: getattr(*k) for k in self.set}
        for (mod, name), v in self.set.items():
            setattr(mod, name, v)

    def __exit__(self, *exc):
        for (mod, name), v in self.old.items():
            setattr(mod, name, v)


@section
def decode(res, name: str, model, sizes: list[int], profile=(1, 64)):
    nb = CTX // BS + 1
    cache = make_cache(model, max(sizes) + 1, max(sizes) * nb)
    bw = RES.get("ceilings", {}).get("copy_bw_GBps", 4300.0)
    runner = CudaGraphRunner(model, cache, nb, max_batch=max(sizes), batch_sizes=sizes)
    setups = {B: decode_setup(model, B, cache, runner) for B in sizes}
    with torch.inference_mode():  # autotune with real routing before the capture's warm-up
        for B, (tok, pos, fb) in setups.items():
            model.compute_logits(model(tok, pos, fb))
    t0 = time.time()
    runner.capture()
    r = res.setdefault(name, {"capture_s": round(time.time() - t0, 1)})
    for B in sizes:
        tok, pos, fb = setups[B]
        with torch.inference_mode():
            runner.run(tok, pos, fb)
        ms = do_bench(runner.graphs[B].replay, warmup=25, rep=200, return_mode="median")
        r[f"B{B}"] = {"graph_ms": round(ms, 4), "tok_per_s": round(B / ms * 1e3), **floor_ms(model, B, bw)}
        if B in profile:
            try:
                r[f"B{B}"]["kernels_us"] = top_kernels(runner.graphs[B].replay, n=16)
            except Exception as e:
                r[f"B{B}"]["profiler_error"] = repr(e)[:300]
        print(f"decode {name} B={B}: {r[f'B{B}']['graph_ms']} ms (floor {r[f'B{B}']['floor_ms']})", flush=True)
        save()
    del runner, cache


def prefill_variants() -> dict:
    """{label: switches} of the fp8 prefill A/B: moe_fp8.SORTED_FP8 x linear_fp8.DENSE_A8 (when
    linear_fp8 has it)."""
    dense = (False, True) if hasattr(linear_fp8, "DENSE_A8") else (None,)
    out = {}
    for d in dense:  # (each switch alone before the pair)
        for srt in (False, True):
            sw = {(moe_fp8, "SORTED_FP8"): srt}
            if d is not None:
                sw[(linear_fp8, "DENSE_A8")] = d
            out["fp8" + ("_sorted" if srt else "") + ("_densea8" if d else "")] = sw
    return out


@section
def prefill(res, name: str, model, variants: dict | None = None):
    """8K-token prefill of `model` under each {label: switches} (default {name: {}}); bf16 ("bf16")
    keeps its logits as the others' reference."""
    T = 8192
    torch.manual_seed(4)
    cache = make_cache(model, 2, T // BS + 1)
    ids = torch.randint(0, DIMS["vocab_size"], (T,), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    pos = torch.arange(T, device="cuda")
    fb = ForwardBatch(cu_seqlens=torch.tensor([0, T], device="cuda"), seq_lens=[T], context_lens=[0], cache=cache,
                      block_tables=torch.arange(T // BS + 1, device="cuda")[None],
                      slot_mapping=torch.arange(T, device="cuda"), state_slots=torch.tensor([0], device="cuda"))

    def step(rows: int = 1):
        with torch.inference_mode():
            return model.compute_logits(model(ids, pos, fb)[-rows:])

    for label, switches in (variants or {name: {}}).items():
        try:
            with dispatch(switches=switches):
                res[f"{label}_ms"] = round(timed(step, reps=5, warmup=2), 3)
                logits = step(PREFILL_ROWS).float()
        except Exception:
            res[f"{label}_error"] = traceback.format_exc()[-2000:]
            print(res[f"{label}_error"], flush=True)
            continue
        if label in ("bf16", "fp8"):  # the references: bf16, and fp8's default dispatch
            PREFILL_REF[label] = logits
        for ref in ("bf16", "fp8"):
            if ref in PREFILL_REF and ref != label:
                res[f"{label}_vs_{ref}"] = compare(logits, PREFILL_REF[ref])
        print(f"prefill 8K {label}: {res[f'{label}_ms']} ms {res.get(f'{label}_vs_bf16', '')}", flush=True)
        save()
    del cache


@section
def experts(res, models: dict, tokens=(8192, 2048)):
    """Layer 0's routed experts of each model on the same x and routing: fp8 (SORTED_FP8 off, on), bf16."""
    ex = {n: next(m for name, m in models[n].named_modules() if name.endswith("mlp.experts")) for n in ("fp8", "bf16")}
    E, k, H, I = DIMS["num_experts"], DIMS["num_experts_per_tok"], DIMS["hidden_size"], DIMS["moe_intermediate_size"]
    g = torch.Generator("cuda").manual_seed(6)
    for T in tokens:
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
        w, ids = moe_route(torch.randn(T, E, device="cuda", generator=g), k, True)
        e8, e16 = ex["fp8"], ex["bf16"]
        calls = {"bf16": lambda: ops.moe_experts(x, e16.gate_up_proj, e16.down_proj, w, ids)}
        for srt in (False, True):
            def call(srt=srt):
                with dispatch(switches={(moe_fp8, "SORTED_FP8"): srt}):
                    return ops.moe_experts_fp8(x, e8.gate_up_proj, e8.gate_up_proj_scale_inv, e8.down_proj,
                                               e8.down_proj_scale_inv, w, ids, e8.block)
            calls["fp8_sorted" if srt else "fp8"] = call
        r = res.setdefault(f"T{T}", {})
        outs = {}
        flop = 2 * T * k * 3 * H * I
        for name, fn in calls.items():
            try:
                with torch.inference_mode():
                    outs[name] = fn()
                    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                r[name] = {"ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1)}
                if T == tokens[0] and name.startswith("fp8"):  # where the time goes, kernel by kernel
                    r[name]["kernels_us"] = top_kernels(fn, n=8)
            except Exception:
                r[name] = {"error": traceback.format_exc()[-2000:]}
            save()
        for a, b in (("fp8", "bf16"), ("fp8_sorted", "bf16"), ("fp8_sorted", "fp8")):
            if a in outs and b in outs:
                r[f"{a}_vs_{b}"] = round(rel_err(outs[a], outs[b]), 5)
        print(f"experts T={T}: {r}", flush=True)


def check_compile() -> int:
    """Compile moe_tma_fp8.py's kernels (every autotune config) for sm_90 with the installed triton,
    specialised as at run time, with triton's ptxas's register / spill report; -> the number of
    failures (no wgmma on fp8, shared memory past 227 KB)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor

    from benchmarks.sm90 import ptxas_report as regs
    from qwen3next.kernels.triton import moe_tma_fp8 as f

    print("triton", triton.__version__)
    fails = []

    def comp(name, fn, sig, const, warps, stages):
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)
                 if sig[n].startswith("*") or (sig[n] == "i32" and n != "RB")}
        try:
            k = triton.compile(ASTSource(fn.fn, sig, const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps, "num_stages": stages})
            ptx = k.asm.get("ptx", "")
            ok = k.metadata.shared <= 232448 and "wgmma" in ptx and "e4m3" in ptx
            print("ok  " if ok else "BAD ", name, const, warps, stages, f"smem {k.metadata.shared}", regs(ptx), flush=True)
            if not ok:
                fails.append(name)
        except Exception as e:
            fails.append(name)
            print("FAIL", name, const, str(e).splitlines()[0][:300], flush=True)

    def desc(r, c):
        return mangle_type(TensorDescriptor(torch.empty(1, 16, dtype=qfp8.FP8), [1, 16], [16, 1], [r, c]))

    i32, i64, f8, f32 = "i32", "*i64", "*fp8e4nv", "*fp32"
    for c in f._gate_up_kernel.configs:
        kw = c.kwargs
        sig = dict(b_desc=desc(kw["BN"], kw["BK"]), cnt_ptr=i64, src_ptr=i64, x_ptr=f8, xs_ptr=f32, s_ptr=f32,
                   h_ptr=f8, hs_ptr=f32, E=i32, H=i32, I=i32, RB=i32)
        comp("gate_up", f._gate_up_kernel, sig, dict(DT=tl.bfloat16, BE=512, **kw), c.num_warps, c.num_stages)
    for c in f._down_kernel.configs:
        kw = c.kwargs
        sig = dict(a_desc=desc(kw["BM"], kw["BK"]), b_desc=desc(kw["BN"], kw["BK"]), cnt_ptr=i64, hs_ptr=f32,
                   s_ptr=f32, y_ptr="*bf16", E=i32, H=i32, I=i32, RB=i32)
        comp("down", f._down_kernel, sig, dict(BE=512, **kw), c.num_warps, c.num_stages)
    print("FAILS:", fails)
    return len(fails)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=R.path)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--sizes", default="1,16,64")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--no-prev", action="store_true", help="skip session 3's fp8 dispatch (fp8_prev)")
    ap.add_argument("--w8a16", action="store_true", help="also the w8a16-experts variant")
    ap.add_argument("--no-w8a16", action="store_true", help="(the default; gpu_run.sh passes it)")
    ap.add_argument("--prefill-only", action="store_true", help="memory and the prefill A/B alone")
    ap.add_argument("--quick", action="store_true",
                    help="decode and the default prefill dispatch only (no A/B, experts, accuracy, fp8_prev)")
    ap.add_argument("--check-compile", action="store_true", help="no GPU: compile moe_tma_fp8 for sm_90")
    a = ap.parse_args()
    if a.check_compile:
        raise SystemExit(1 if check_compile() else 0)
    R.path = a.out
    sizes = [int(s) for s in a.sizes.split(",")]
    import triton

    RES["env"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "python": platform.python_version(), "commit": a.commit,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    ceilings()
    models = {}
    for name in ("bf16", "fp8"):
        before = torch.cuda.memory_allocated()
        t0 = time.time()
        models[name] = build(name == "fp8")
        RES.setdefault("build_s", {})[name] = round(time.time() - t0, 1)
        gc.collect()
        torch.cuda.empty_cache()
        memory(name, models[name], before)
    if a.quick:
        a.no_accuracy = a.no_prev = True
    if a.prefill_only:
        a.no_accuracy = a.no_prev = True
        a.w8a16 = False
    else:
        decode("fp8", models["fp8"], sizes)
        decode("bf16", models["bf16"], sizes)
    gc.collect()
    torch.cuda.empty_cache()
    if not a.no_prefill:
        prefill("bf16", models["bf16"])
        prefill("fp8", models["fp8"], None if a.quick else prefill_variants())
        if not a.quick:
            experts(models)
    if not a.no_accuracy:
        models["deq"] = dequantised_copy(models["fp8"])
        accuracy(models)
        del models["deq"]
        gc.collect()
        torch.cuda.empty_cache()
    if not a.no_prev:
        with dispatch(prev=True):
            decode("fp8_prev", models["fp8"], sizes, profile=(1, 64))
    if a.w8a16:
        with dispatch(w8a16=True):
            decode("fp8_w8a16", models["fp8"], [b for b in sizes if b >= 16], profile=())
            if not a.no_prefill:
                prefill("fp8_w8a16", models["fp8"])
    RES["peak_allocated_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    save()
    dec = RES.get("decode", {})
    for B in sizes:
        f, p, b = (dec.get(n, {}).get(f"B{B}", {}) for n in ("fp8", "fp8_prev", "bf16"))
        print(f"B={B:3d}: fp8 {f.get('graph_ms')} ms (floor {f.get('floor_ms')}) | fp8_prev {p.get('graph_ms')} | "
              f"bf16 {b.get('graph_ms')} ms (floor {b.get('floor_ms')})")
    for n in ("fp8", "fp8_prev", "bf16"):
        for B in (1, 64):
            print(n, B, dec.get(n, {}).get(f"B{B}", {}).get("kernels_us", [])[:10])
    print("prefill", RES.get("prefill"), "\nmemory", RES.get("memory"), "\naccuracy", RES.get("accuracy"))


if __name__ == "__main__":
    main()
