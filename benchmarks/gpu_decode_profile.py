"""Where a decode step's time goes on the GPU: the 8-layer 80B-dimension slice of gpu_model.py,
CUDA-graph replays at a few batch sizes for each MoE variant, their kernel tables (every kernel
name with its launches and device time per step; the B = 1 table printed), and cuBLAS at the decode projections'
shapes (M = 1 row, weights rotated past the L2) for comparison.

    python benchmarks/gpu_decode_profile.py --out gpu_decode_profile.json [--batches 1,8,16,64]

Variants: `unfused` (routed experts by GEMV, the shared expert by four cuBLAS GEMMs and torch ops),
`fused` (the shared expert as one more GEMV assignment: ops.moe_experts_shared).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch
from triton.testing import do_bench

from benchmarks.gpu_model import BS, CTX, build_models, decode_setup, make_cache
from qwen3next.engine.cuda_graph import CudaGraphRunner
from qwen3next.kernels import ops

RES: dict = {}
OUT = "gpu_decode_profile.json"


def save() -> None:
    with open(OUT, "w") as f:
        json.dump(RES, f, indent=1)


def kernel_table(fn, reps: int = 5) -> list:
    """[(kernel name, launches per call, device us per call)] over `reps` calls, largest first."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if t:
            rows.append((ev.key[:100], ev.count // reps, round(t / reps, 1)))
    rows.sort(key=lambda r: -r[2])
    return [("TOTAL", sum(r[1] for r in rows), round(sum(r[2] for r in rows), 1))] + rows


def set_variant(name: str, real_ok) -> None:
    ops.moe_experts_shared_ok = real_ok if name != "unfused" else (lambda *a: False)


def decode_variants(ours, batches: list[int]) -> None:
    nb = CTX // BS + 1
    cache = make_cache(ours, max(batches) + 1, max(batches) * nb)
    real_ok = ops.moe_experts_shared_ok
    for name in ("unfused", "fused"):
        r = RES.setdefault("decode", {}).setdefault(name, {})
        try:
            set_variant(name, real_ok)
            runner = CudaGraphRunner(ours, cache, nb, max_batch=max(batches), batch_sizes=batches)
            runner.capture()
            for B in batches:
                tok, pos, fb = decode_setup(ours, B, cache, runner)
                with torch.inference_mode():
                    runner.run(tok, pos, fb)
                g = runner.graphs[B]
                r[f"B{B}_ms"] = round(do_bench(g.replay, warmup=25, rep=200, return_mode="median"), 4)
                r[f"B{B}_kernels"] = kernel_table(g.replay)
            print(f"decode {name}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k.endswith("_ms")), flush=True)
            del runner
        except Exception:
            r["error"] = traceback.format_exc()[-2000:]
            print(r["error"], flush=True)
        save()
    set_variant("fused", real_ok)
    del cache


def cublas_gemv(ns: list[int], K: int = 2048, copies_bytes: float = 512e6) -> None:
    """x [1, K] @ W[N, K]^T through cuBLAS in a CUDA graph over weight copies that exceed the L2."""
    r = RES.setdefault("cublas_m1", {})
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    for N in ns:
        n_copies = max(4, min(64, int(copies_bytes // (N * K * 2))))
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(n_copies)]
        fn = lambda: [torch.nn.functional.linear(x, w) for w in ws]  # noqa: E731
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        us = do_bench(g.replay, warmup=10, rep=100, return_mode="median") * 1e3 / n_copies
        r[str(N)] = {"us": round(us, 2), "TBps": round(N * K * 2 / us / 1e6, 2)}

    print("cuBLAS M=1: " + json.dumps(r), flush=True)
    save()


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--batches", default="1,8,16,64")
    ap.add_argument("--commit", default=None)
    a = ap.parse_args()
    OUT = a.out
    RES["env"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": a.commit,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    ours, _ = build_models(with_hf=False)
    decode_variants(ours, [int(b) for b in a.batches.split(",")])
    try:
        cublas_gemv([1, 64, 512, 1024, 1537, 2048, 4096, 8192, 12288])
    except Exception:
        RES["cublas_error"] = traceback.format_exc()[-1500:]
    save()
    for name, r in RES["decode"].items():  # the short table last (the reply shows the tail)
        for row in r.get("B1_kernels", [])[:16]:
            print(f"{name:12s} {row[1]:4d} {row[2]:8.1f}  {row[0]}")


if __name__ == "__main__":
    main()
