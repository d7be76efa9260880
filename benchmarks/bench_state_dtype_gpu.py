"""GPU benchmark of bf16 recurrent states (--mamba-ssm-cache-dtype bfloat16) against fp32 ones: the
80B dimensions on 8 layers (benchmarks/gpu_model.py's slice, built by gpu_fp8.build: random bf16
weights, and the same weights quantised to block-FP8 by layers/quant.py's to_fp8_), one GPU.

    python benchmarks/bench_state_dtype_gpu.py --out state_dtype.json [--commit SHA] [--sizes 1,16,64,256]
    # the pipelined decode kernel (gdn_decode variant="pipelined") against the default:
    python benchmarks/bench_state_dtype_gpu.py --out decode_pipe.json --sizes 64,256 --weights fp8 \
        --sweep --decode-variants tiles,pipelined --no-accuracy

Sections, in this order (each writes its results into the JSON as it finishes; a failing one
records its error):
  kernel    one DeltaNet layer's fused decode step (triton/gdn_decode.py) alone at each B, on an fp32
            and a bf16 pool: us, and GB/s over the state bytes read + written (B <= 16: host-bound,
            the Python wrapper's launches take longer than the kernels), for the default kernel and
            the pipelined variant (rows `B{n}_pipelined`, with its relative error against the default
            after one step); --sweep: also each (dv tile, warps) of SWEEP and each (dv tile, warps,
            items, stages) of gdn_decode.PIPE_SWEEP at B = 64 and 256
  decode    one step (forward + logits) at each B with 1K tokens of context, by CUDA-graph replay,
            for bf16 and fp8 weights, with the pool in float32 and in bfloat16, per decode kernel
            variant of --decode-variants (rows `{weights}_pipelined` for the pipelined one); floors = bytes the
            step must move (weights but the embedding, the experts uniform routing touches, the
            states read + written in the pool's dtype, KV) / measured copy bandwidth
  accuracy  per weight type: 16 prompts x 1008 tokens prefilled through the cached path, then 8
            teacher-forced decode steps (the same random tokens for both), once per pool dtype:
            relative error of the bf16 pool's logits vs the fp32 pool's and argmax agreement, at
            the prompts' last position, the first decode step and the last
Medians throughout (triton.testing.do_bench).
"""

from __future__ import annotations

import argparse
import gc
import platform
import time

import torch
from triton.testing import do_bench

from benchmarks.gpu_fp8 import build, floor_ms
from benchmarks.gpu_model import BS, CTX, DIMS, decode_setup, make_cache, rel_err
from benchmarks.results import Results
from qwen3next.engine.cuda_graph import CudaGraphRunner
from qwen3next.forward_batch import ForwardBatch
from qwen3next.kernels.triton import gdn_decode as gdn_decode_mod
from qwen3next.kernels.triton.gdn_decode import gdn_decode

R = Results("bench_state_dtype_gpu.json")
RES = R.data
POOLS = {"fp32": torch.float32, "bf16": torch.bfloat16}
# one DeltaNet layer's state per sequence: 32 value heads x 128 x 128
HV, DK, DV, HK = DIMS["linear_num_value_heads"], 128, 128, DIMS["linear_num_key_heads"]
NUM_GDN = 6  # DeltaNet layers in the slice
SWEEP = [(16, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8)]  # (bv, num_warps) of gdn_decode


save, section = R.save, R.section


def state_bytes(B: int, dtype: torch.dtype) -> int:
    """State bytes one decode step reads and writes over the slice's DeltaNet layers."""
    return NUM_GDN * HV * DK * DV * torch.empty((), dtype=dtype).element_size() * 2 * B


def ceilings() -> float:
    n = 1 << 30
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=100, return_mode="median")
    RES["copy_bw_GBps"] = round(2 * n / ms / 1e6, 1)
    return RES["copy_bw_GBps"]


def kernel_runs(sizes: list[int], sweep: bool) -> list[tuple[int, str, dict]]:
    """(B, row name, gdn_decode kwargs) of the kernel section."""
    runs = [(B, f"B{B}", {"variant": "tiles"}) for B in sizes]
    runs += [(B, f"B{B}_pipelined", {"variant": "pipelined"}) for B in sizes]
    if sweep:
        for B in (64, 256):
            runs += [(B, f"B{B}_bv{bv}_w{w}", {"bv": bv, "num_warps": w, "variant": "tiles"}) for bv, w in SWEEP]
            runs += [(B, f"B{B}_pipe_bv{bv}_w{w}_i{n}_s{st}", {"bv": bv, "num_warps": w, "items": n, "stages": st,
                                                               "variant": "pipelined"})
                     for bv, w, n, st in gdn_decode_mod.PIPE_SWEEP]
    return runs


@section
def kernel(res, sizes: list[int], sweep: bool = False):
    C = 2 * HK * DK + HV * DV
    g = torch.Generator(device="cuda").manual_seed(0)
    for B, key, kw in kernel_runs(sizes, sweep):
        m = torch.randn(B, C, device="cuda", dtype=torch.bfloat16, generator=g)
        ab = torch.randn(B, 2 * HV, device="cuda", dtype=torch.bfloat16, generator=g)
        w = 0.5 * torch.randn(C, 4, device="cuda", dtype=torch.bfloat16, generator=g)
        conv = torch.randn(B, C, 3, device="cuda", dtype=torch.bfloat16, generator=g)
        A_log, dtb = torch.randn(HV, device="cuda", generator=g), torch.randn(HV, device="cuda", dtype=torch.bfloat16)
        slots = torch.arange(B, device="cuda")
        row = res[key] = {}
        for name, dt in POOLS.items():
            pool = (0.1 * torch.randn(B, HV, DK, DV, device="cuda", generator=g)).to(dt)
            if kw.get("variant") == "pipelined":  # one step of each kernel from the same pools
                c1, p1, c2, p2 = conv.clone(), pool.clone(), conv.clone(), pool.clone()
                o1 = gdn_decode(m, ab[:, HV:], ab[:, :HV], w, c1, p1, slots, A_log, dtb, HK, variant="tiles")
                o2 = gdn_decode(m, ab[:, HV:], ab[:, :HV], w, c2, p2, slots, A_log, dtb, HK, **kw)
                row[f"{name}_vs_tiles"] = {"o_rel_err": float(f"{rel_err(o2, o1):.3g}"),
                                           "state_rel_err": float(f"{rel_err(p2, p1):.3g}")}
            us = 1e3 * do_bench(lambda: gdn_decode(m, ab[:, HV:], ab[:, :HV], w, conv, pool, slots, A_log, dtb, HK,
                                                   **kw), warmup=10, rep=50, return_mode="median")
            row[name] = {"us": round(us, 1), "state_GBps": round(state_bytes(B, dt) / NUM_GDN / us / 1e3, 1)}
        print(f"kernel {key}: {row}", flush=True)


@section
def decode(res, name: str, model, sizes: list[int], bw: float):
    nb = CTX // BS + 1
    cache = make_cache(model, max(sizes) + 1, max(sizes) * nb)
    fp32_states = cache.recurrent
    out = res.setdefault(name, {})
    for pool, dt in POOLS.items():
        cache.recurrent = {i: t.to(dt) for i, t in fp32_states.items()}
        runner = CudaGraphRunner(model, cache, nb, max_batch=max(sizes), batch_sizes=sizes)
        setups = {B: decode_setup(model, B, cache, runner) for B in sizes}
        with torch.inference_mode():  # compile / autotune with real routing before the capture
            for tok, pos, fb in setups.values():
                model.compute_logits(model(tok, pos, fb))
        runner.capture()
        for B in sizes:
            tok, pos, fb = setups[B]
            with torch.inference_mode():
                runner.run(tok, pos, fb)
            ms = do_bench(runner.graphs[B].replay, warmup=10, rep=100, return_mode="median")
            f = floor_ms(model, B, bw)  # counts fp32 states: swap in this pool's bytes
            total = f["bytes_MB"] * 1e6 - state_bytes(B, torch.float32) + state_bytes(B, dt)
            out.setdefault(f"B{B}", {})[pool] = {"graph_ms": round(ms, 4), "tok_per_s": round(B / ms * 1e3),
                                                 "floor_ms": round(total / bw / 1e6, 4)}
            print(f"decode {name} {pool} pool B={B}: {out[f'B{B}'][pool]}", flush=True)
        del runner, setups
        gc.collect()
        torch.cuda.empty_cache()
        save()
    del cache, fp32_states


def _logits(model, dt: torch.dtype, ids, dec_ids, B: int, T: int) -> list[torch.Tensor]:
    """Prefill B prompts of T tokens into a fresh cache with a `dt` pool, then teacher-forced decode
    steps of dec_ids [steps, B] -> [last prompt rows' logits, each step's logits]."""
    nb = CTX // BS + 1
    torch.manual_seed(0)
    cache = make_cache(model, B + 1, B * nb)
    cache.recurrent = {i: torch.zeros_like(t, dtype=dt) for i, t in cache.recurrent.items()}
    dev = "cuda"
    tables = torch.arange(B * nb, device=dev).view(B, nb)
    p = torch.arange(T, device=dev)
    fb = ForwardBatch(cu_seqlens=torch.arange(B + 1, device=dev) * T, seq_lens=[T] * B, context_lens=[0] * B,
                      cache=cache, block_tables=tables,
                      slot_mapping=(tables[:, p // BS] * BS + p % BS).reshape(-1),
                      state_slots=torch.arange(B, device=dev))
    outs = []
    with torch.inference_mode():
        h = model(ids, p.repeat(B), fb)
        outs.append(model.compute_logits(h[T - 1::T]))
        for step, tok in enumerate(dec_ids):
            pos = torch.full((B,), T + step, dtype=torch.long, device=dev)
            blk = tables[:, (T + step) // BS]
            fbd = ForwardBatch(cu_seqlens=torch.arange(B + 1, device=dev), seq_lens=[1] * B,
                               context_lens=[T + step] * B, cache=cache, block_tables=tables,
                               slot_mapping=blk * BS + (T + step) % BS, state_slots=torch.arange(B, device=dev))
            outs.append(model.compute_logits(model(tok, pos, fbd)))
    del cache
    return outs


@section
def accuracy(res, name: str, model, B: int = 16, T: int = CTX - 16, steps: int = 8):
    g = torch.Generator(device="cuda").manual_seed(5)
    ids = torch.randint(0, DIMS["vocab_size"], (B * T,), device="cuda", generator=g)
    dec = torch.randint(0, DIMS["vocab_size"], (steps, B), device="cuda", generator=g)
    ref = _logits(model, torch.float32, ids, dec, B, T)
    got = _logits(model, torch.bfloat16, ids, dec, B, T)

    def cmp(a, b):
        return {"rel_err": round(rel_err(a, b), 5),
                "argmax_agree": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4)}

    res[name] = {"prompt_last": cmp(got[0], ref[0]), "decode_first": cmp(got[1], ref[1]),
                 "decode_last": cmp(got[-1], ref[-1]),
                 "decode_max_rel_err": round(max(rel_err(a, b) for a, b in zip(got[1:], ref[1:])), 5)}
    print(f"accuracy {name}: {res[name]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=R.path)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--sizes", default="1,16,64,256")
    ap.add_argument("--weights", default="bf16,fp8", help="which models: bf16, fp8 or both ('' = none)")
    ap.add_argument("--sweep", action="store_true", help="the kernel section also sweeps (bv, num_warps)")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--decode-variants", default="tiles",
                    help="decode kernel variants the decode section times: tiles, pipelined or both")
    a = ap.parse_args()
    R.path = a.out
    sizes = [int(s) for s in a.sizes.split(",")]
    import triton

    RES["env"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "python": platform.python_version(), "commit": a.commit,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    bw = ceilings()
    kernel(sizes, a.sweep)
    for name in filter(None, a.weights.split(",")):
        t0 = time.time()
        model = build(name == "fp8")
        RES.setdefault("build_s", {})[name] = round(time.time() - t0, 1)
        for variant in a.decode_variants.split(","):
            gdn_decode_mod.PIPELINED = variant == "pipelined"  # read per call, so the capture takes it
            decode(name if variant == "tiles" else f"{name}_{variant}", model, sizes, bw)
        gdn_decode_mod.PIPELINED = False
        if not a.no_accuracy:
            accuracy(name, model)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    save()
    for name, rows in RES.get("decode", {}).items():
        if not isinstance(rows, dict):
            continue
        for B, r in rows.items():
            if isinstance(r, dict) and "fp32" in r and "bf16" in r:
                print(f"{name} {B}: fp32 pool {r['fp32']['graph_ms']} ms (floor {r['fp32']['floor_ms']}) | "
                      f"bf16 pool {r['bf16']['graph_ms']} ms (floor {r['bf16']['floor_ms']})")
    print("accuracy", {k: v for k, v in RES.get("accuracy", {}).items() if k != "wall_s"})


if __name__ == "__main__":
    main()
