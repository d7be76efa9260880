"""FP8 dense projections at prefill sizes on one GPU: the w8a8 GEMM (triton/linear_fp8_a8.py) against
the w8a16 prefill path it would replace (dequantise into bf16, then cuBLAS), at the 80B's projection
shapes in the 8-layer slice (6 DeltaNet + 2 attention layers, shared expert in every layer).

    python benchmarks/bench_fp8_dense_gpu.py --out fp8_dense.json [--tokens 8192] [--configs 4]
    PYTHONPATH=.:/tmp/tri36 python benchmarks/bench_fp8_dense_gpu.py --check-compile   # no GPU needed

Per shape: dequant + cuBLAS (today's path), cuBLAS alone on a bf16 weight (its GEMM), quantize_act
alone, gemm_a8 with each of the first `--configs` autotune configs (launched directly), the whole
w8a8 path (with `--autotune`: the autotuner over every config, ~40 s of compiles), relative errors vs
the fp32 references; totals weighted by how often each shape runs in one prefill. Also tried:
torch._scaled_mm with 1x128 activation / 128x128 weight block scales (cuBLAS, private API; its
layout constraints are not documented for torch 2.11: each variant's error is recorded, not
raised). Medians of triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# (name, N, K, calls per prefill of the 8-layer slice)
DEV = "cuda"
SHAPES = (("in_proj_qkvz", 12288, 2048, 6), ("out_proj/o_proj", 2048, 4096, 8), ("q_proj", 8192, 2048, 2),
          ("k/v, shared gate/up", 512, 2048, 20), ("shared down", 2048, 512, 8))


def check_compile() -> int:
    """Compile every config of the kernels for sm_90 with the installed triton; ptxas -v's register
    and spill counts."""
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qwen3next.kernels.triton import linear_fp8_a8 as A

    print("triton", triton.__version__)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    fails = []

    def comp(name, fn, sig, const, warps, stages, div=()):
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if sig[n].startswith("*") or n in div}
        try:
            k = triton.compile(ASTSource(fn, sig, const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps, "num_stages": stages})
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                f.write(k.asm["ptx"])
                f.flush()
                r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                                   capture_output=True, text=True)
            info = "; ".join(ln.split(":", 1)[-1].strip() for ln in r.stderr.splitlines() if "Used" in ln or "spill" in ln)
            print("ok  ", name, const, warps, stages, info, "smem", k.metadata.shared, flush=True)
        except Exception as e:  # noqa: BLE001 (report every failure, keep going)
            fails.append(name)
            print("FAIL", name, const, str(e).splitlines()[0][:300], flush=True)

    for yt in ("bf16", "fp32"):
        for c in A._CONFIGS + A.WS_CONFIGS:
            bm, bn = c.kwargs["BM"], c.kwargs["BN"]
            for sk_div in ((), ("SK",)):  # K = 512 (4 k blocks) and K >= 2048 (16 | SK) specialise apart
                sig = dict(a_desc=f"tensordesc<fp8e4nv[{bm}, 128]>", b_desc=f"tensordesc<fp8e4nv[{bn}, 128]>",
                           xs_ptr="*fp32", s_ptr="*fp32", y_ptr="*" + yt, M="i32", N="i32", K="i32", MC="i32",
                           SK="i32")
                comp("gemm_a8_" + yt, A._a8_kernel.fn, sig, dict(BLK_N=128, GROUP_M=8, **c.kwargs), c.num_warps,
                     c.num_stages, div=("N", "K") + sk_div)
    for xt in ("bf16", "fp32"):
        comp("quant_" + xt, A._quant_kernel, dict(x_ptr="*" + xt, q_ptr="*fp8e4nv", s_ptr="*fp32", M="i32", K="i32"),
             dict(BR=32, G=128), 4, 3, div=("K",))
    print("FAILS:", fails)
    return 1 if fails else 0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def scaled_mm_variants(x8, xs, w8, s, y) -> dict:
    """torch._scaled_mm(x8, w8^T) with (1x128, 128x128) block scales in a few scale layouts: per
    variant its time (ms) and relative error vs the Triton result y, or the error it raised."""
    from triton.testing import do_bench

    out = {}
    for name, sa, sb in (("xs_mmajor,sT", xs, s.t()), ("xs_mmajor,sT_contig", xs, s.t().contiguous()),
                         ("xs_contig,sT", xs.contiguous(), s.t())):
        try:
            f = lambda: torch._scaled_mm(x8, w8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # noqa: E731
            out[name] = {"err_vs_triton": rel(f(), y), "ms": do_bench(f)}
        except Exception as e:  # noqa: BLE001 (a probe: record why it is refused)
            out[name] = str(e).splitlines()[0][:200]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fp8_dense.json")
    ap.add_argument("--tokens", default="8192")
    ap.add_argument("--configs", type=int, default=4, help="time the first n autotune configs one by one")
    ap.add_argument("--ws", type=int, default=1, help="1: also time the warp-specialised configs")
    ap.add_argument("--autotune", action="store_true", help="also time the autotuned path (all configs)")
    ap.add_argument("--check-compile", action="store_true")
    args = ap.parse_args()
    if args.check_compile:
        return check_compile()

    from triton.testing import do_bench

    from qwen3next.kernels import fp8 as ref
    from qwen3next.kernels.triton import linear_fp8 as lin
    from qwen3next.kernels.triton import linear_fp8_a8 as A

    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "configs": [str(c) for c in A._CONFIGS[:args.configs] + A.WS_CONFIGS * args.ws], "shapes": {}}
    t0 = time.time()
    for M in (int(t) for t in args.tokens.split(",")):
        tot = {"dequant_cublas": 0.0, "cublas_only": 0.0, "a8_best_config": 0.0, "quant": 0.0}
        if args.autotune:
            tot["a8_autotuned"] = 0.0
        for name, N, K, calls in SHAPES:
            x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
            w8, s = ref.quantize(torch.randn(N, K, device=DEV) * K ** -0.5)
            wb = ref.dequantize(w8, s, ref.BLOCK, torch.bfloat16)
            x8, xs = A.quantize_act(x)
            r = {"calls": calls}
            r["dequant_cublas"] = do_bench(lambda: lin.fp8_linear(x, w8, s, path="dequant"))
            r["cublas_only"] = do_bench(lambda: x @ wb.t())
            r["quant"] = do_bench(lambda: A.quantize_act(x))
            want = ref.fp8_linear_a8(x, w8, s, act=(x8, xs))
            # per config: time and error (a config off by more than bf16 rounding does not count)
            per_cfg, cfg_err = [], []
            for cfg in A._CONFIGS[:args.configs] + A.WS_CONFIGS * args.ws:
                cfg_err.append(rel(A.gemm_a8(x8, xs, w8, s, ref.BLOCK, x.dtype, config=cfg), want))
                per_cfg.append(do_bench(lambda: A.gemm_a8(x8, xs, w8, s, ref.BLOCK, x.dtype, config=cfg)))
            r["gemm_a8_per_config"], r["err_per_config"] = per_cfg, cfg_err
            best = min(t for t, e in zip(per_cfg, cfg_err) if e < 1e-2)
            r["a8_best_config"] = r["quant"] + best
            y = A.gemm_a8(x8, xs, w8, s, ref.BLOCK, x.dtype, config=A._CONFIGS[0])
            if args.autotune:
                y = lin.fp8_linear(x, w8, s, path="a8")  # autotunes here
                r["a8_autotuned"] = do_bench(lambda: lin.fp8_linear(x, w8, s, path="a8"))
            r["scaled_mm"] = scaled_mm_variants(x8, xs, w8, s, y)
            r["tflops_gemm_a8_best"] = 2 * M * N * K / best * 1e-9
            r["tflops_cublas_bf16"] = 2 * M * N * K / r["cublas_only"] * 1e-9
            r["err_vs_a8_ref"] = rel(y, want)
            r["err_vs_w8a16"] = rel(y, x @ wb.t())
            res["shapes"][f"M={M} {name} {K}->{N}"] = r
            for k in tot:
                tot[k] += calls * r[k]
            print(f"M={M} {name:22s} {K:5d}->{N:5d} x{calls:2d}: dequant+cuBLAS {r['dequant_cublas'] * 1e3:7.1f} us"
                  f" (cuBLAS {r['cublas_only'] * 1e3:7.1f}, {r['tflops_cublas_bf16']:.0f} TF) | a8 "
                  f"{r['a8_best_config'] * 1e3:7.1f} us (quant {r['quant'] * 1e3:5.1f}, gemm per config "
                  f"{[round(t * 1e3, 1) for t in per_cfg]}, {r['tflops_gemm_a8_best']:.0f} TF) | errs "
                  f"{[f'{e:.0e}' for e in cfg_err]} "
                  f"{r['err_vs_a8_ref']:.1e} / vs w8a16 {r['err_vs_w8a16']:.3f} | scaled_mm {r['scaled_mm']}",
                  flush=True)
            with open(args.out, "w") as f:  # after every shape: a later hang keeps what was measured
                json.dump(res, f, indent=1)
        res[f"total_per_prefill_ms_M={M}"] = tot
        print(f"M={M} per prefill (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in tot.items()), flush=True)
    res["wall_s"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
