"""Prefill MoE experts on one GPU: the Triton grouped GEMM over gathered, padded rows (triton/moe.py)
against the expert-sorted path (triton/moe_grouped.py) with torch._grouped_mm or moe_tma.py's TMA
kernels as its GEMMs, at the 80B's expert shapes (512 experts top-10, hidden 2048, intermediate
512), bf16, uniform random routing.

    python benchmarks/bench_moe_prefill_gpu.py --out moe_prefill.json [--tokens 8192,2048,512] [--model]
    PYTHONPATH=.:/tmp/tri36 python benchmarks/bench_moe_prefill_gpu.py --check-compile   # no GPU needed

Per token count: each path's whole experts call (ms, TFLOP/s over the routed FLOPs), its GEMMs one
by one, relative error against the old path (and the torch reference at the smallest size);
ceilings: a 8192^3 matmul, and a bmm of equal-sized groups (the grouped GEMMs' best case).
`--model` times the 8-layer model's 8K prefill (benchmarks/gpu_model.py's slice) with each path.
Medians of triton.testing.do_bench; the expert weights (3.2 GB) are far past L2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

E, H, I, K = 512, 2048, 512, 10
PATHS = ("old", "torch", "triton", "triton_gather", "gather_torch")
DEV = "cuda"


def check_compile() -> int:
    """Compile the new kernels for sm_90 with the installed triton (specialised as at run time)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor

    from qwen3next.kernels.triton import moe_grouped as g
    from qwen3next.kernels.triton import moe_tma as t

    print("triton", triton.__version__)
    fails = []
    k_smem = [0]

    def comp(name, fn, sig, const, warps=4, stages=3, nospec=()):
        fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)
                 if sig[n].startswith("*") or (sig[n] == "i32" and n not in nospec)}
        try:
            k = triton.compile(ASTSource(fn, sig, const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps, "num_stages": stages})
            wgmma = "wgmma" in k.asm.get("ptx", "")
            k_smem.append(k.metadata.shared)
            print("ok  ", name, const, warps, stages, f"smem {k.metadata.shared} wgmma {wgmma}", flush=True)
        except Exception as e:
            fails.append(name)
            print("FAIL", name, const, str(e).splitlines()[0][:200], flush=True)

    b, i64, i32 = "*bf16", "*i64", "i32"
    for copy in (True, False):
        comp("sort_rows", g._sort_rows_kernel, dict(ids_ptr=i64, rank_ptr=i64, end_ptr=i64, cnt_ptr=i64, x_ptr=b,
             xs_ptr=b, pos_ptr=i64, src_ptr=i64, M=i32, H=i32), dict(TOPK=K, BA=16, BH=512, COPY=copy), nospec=("M",))
    comp("silu_mul", g._silu_mul_kernel, dict(gu_ptr=b, h_ptr=b, M=i32, I=i32, S=i32), dict(BR=16, BI=256),
         nospec=("M",))
    comp("unsort_sum", g._unsort_sum_kernel, dict(y_ptr=b, pos_ptr=i64, w_ptr="*fp32", o_ptr=b, T=i32, H=i32, YS=i32),
         dict(TOPK=K, BH=1024), nospec=("T",))
    def desc(r, cols):
        return mangle_type(TensorDescriptor(torch.empty(1, 8, dtype=torch.bfloat16), [1, 8], [8, 1], [r, cols]))

    for name, fn, gather in (("tma_gate_up", t._gate_up_kernel, False), ("tma_gate_up", t._gate_up_kernel, True),
                             ("tma_down", t._down_kernel, None)):
        for c in fn.configs:
            bm, bn, bk = c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]
            sig = {"a_desc": desc(bm, bk), "b_desc": desc(bn, bk), "cnt_ptr": i64}
            sig.update({"h_ptr": b, "x_ptr": b, "src_ptr": i64} if gather is not None else {"y_ptr": b})
            sig.update({"E": i32, "H": i32, "I": i32, "RB": i32})
            const = dict(BE=512, **c.kwargs, **({} if gather is None else {"GATHER": gather}))
            comp(name, fn, sig, const, c.num_warps, c.num_stages, nospec=("RB",))
            if k_smem[-1] > 232448:
                fails.append(f"{name} {const} smem {k_smem[-1]} > 227 KB")
    print("FAILS:", fails)
    return 1 if fails else 0


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def sweep(kernels) -> dict:
    """{kernel config: median ms} for each (autotuned kernel, call) with each config alone."""
    out = {}
    for kern, call in kernels:
        configs, cache = kern.configs, kern.cache
        for c in configs:
            kern.configs, kern.cache = [c], {}
            try:
                v = round(bench(call), 4)
            except Exception as e:  # out of shared memory or registers: recorded
                v = repr(e)[:120]
            out.setdefault(kern.fn.__name__, []).append((c.kwargs, c.num_warps, c.num_stages, v))
        kern.configs, kern.cache = configs, cache
    return out


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()) if torch.isfinite(a).all() else float("inf")


def experts_section(tokens: list[int], res: dict) -> None:
    from qwen3next.kernels import moe as ref
    from qwen3next.kernels.triton import moe as old
    from qwen3next.kernels.triton import moe_grouped as g
    from qwen3next.kernels.triton import moe_tma as t

    gen = torch.Generator(device=DEV).manual_seed(0)
    gate_up = (torch.randn(E, 2 * I, H, device=DEV, generator=gen) * 0.02).bfloat16()
    down = (torch.randn(E, H, I, device=DEV, generator=gen) * 0.02).bfloat16()
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = bench(lambda: a @ a)
    res["matmul_8192_tflops"] = round(2 * 8192**3 / ms / 1e9, 1)
    del a
    for T in tokens:  # largest first: the old path's autotune key saturates at 4096 rows (tuned here at T*k)
        r = res.setdefault(f"T{T}", {})
        M = T * K
        fl_up, fl_down = 2 * M * H * 2 * I, 2 * M * I * H
        x = torch.randn(T, H, device=DEV, generator=gen).bfloat16()
        w, ids = ref.moe_route(torch.randn(T, E, device=DEV, generator=gen), K, True)
        outs = {}
        calls = {"old": lambda: old.moe_experts(x, gate_up, down, w, ids, gemv=False),
                 "torch": lambda: g.moe_experts_sorted(x, gate_up, down, w, ids, gemm="torch"),
                 "triton": lambda: g.moe_experts_sorted(x, gate_up, down, w, ids, gemm="triton"),
                 "triton_gather": lambda: g.moe_experts_sorted(x, gate_up, down, w, ids, gemm="triton_gather"),
                 "gather_torch": lambda: g.moe_experts_sorted(x, gate_up, down, w, ids, gemm="gather_torch")}
        for p in PATHS:
            try:
                outs[p] = calls[p]()
                ms = bench(calls[p])
                r[p] = {"ms": round(ms, 4), "tflops": round((fl_up + fl_down) / ms / 1e9, 1)}
            except Exception as e:  # record and go on: one call times everything
                r[p] = {"error": repr(e)[:300]}
        for p in outs:
            r[p]["rel_err_vs_old"] = rel(outs[p], outs["old"]) if "old" in outs else None
        if T == min(tokens):
            want = ref.moe_experts(x, gate_up, down, w, ids)
            for p in outs:
                r[p]["rel_err_vs_ref"] = rel(outs[p], want)
        # the sorted path's steps one by one
        try:
            xs, cnt, offs, pos, src = g.sort_rows(x, ids, E)
            r["sort_rows_ms"] = round(bench(lambda: g.sort_rows(x, ids, E)), 4)
            gu = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs)
            ms = bench(lambda: torch._grouped_mm(xs, gate_up.transpose(1, 2), offs))
            r["torch_gate_up"] = {"ms": round(ms, 4), "tflops": round(fl_up / ms / 1e9, 1)}
            h = g.silu_mul(gu)
            r["silu_mul_ms"] = round(bench(lambda: g.silu_mul(gu)), 4)
            ms = bench(lambda: torch._grouped_mm(h, down.transpose(1, 2), offs))
            r["torch_down"] = {"ms": round(ms, 4), "tflops": round(fl_down / ms / 1e9, 1)}
            ms = bench(lambda: t.gate_up(xs, gate_up, cnt))
            r["triton_gate_up"] = {"ms": round(ms, 4), "tflops": round(fl_up / ms / 1e9, 1),
                                   "rel_err_vs_torch": rel(t.gate_up(xs, gate_up, cnt), h)}
            ms = bench(lambda: t.gate_up(x, gate_up, cnt, src))
            r["triton_gather_gate_up"] = {"ms": round(ms, 4), "tflops": round(fl_up / ms / 1e9, 1)}
            ms = bench(lambda: t.down(h, down, cnt))
            r["triton_down"] = {"ms": round(ms, 4), "tflops": round(fl_down / ms / 1e9, 1)}
            r["tuned"] = {n: {str(k): str(v) for k, v in f.cache.items()}
                          for n, f in (("gate_up", t._gate_up_kernel), ("down", t._down_kernel))}
            if T == max(tokens):  # every TMA config alone (what the autotuner chose from)
                r["tma_sweep_ms"] = sweep(((t._gate_up_kernel, lambda: t.gate_up(xs, gate_up, cnt)),
                                           (t._gate_up_kernel, lambda: t.gate_up(x, gate_up, cnt, src)),
                                           (t._down_kernel, lambda: t.down(h, down, cnt))))
            if M > 128 * E:  # torch's grouped_mm takes its 64x128 tile when rows / groups <= 128: two calls
                M1 = 128 * E
                oa, ob = offs.clamp(max=M1), (offs - M1).clamp(min=0)
                for name, a_, w_, fl in (("gate_up", xs, gate_up, fl_up), ("down", h, down, fl_down)):
                    ms = bench(lambda: (torch._grouped_mm(a_[:M1], w_.transpose(1, 2), oa),
                                        torch._grouped_mm(a_[M1:], w_.transpose(1, 2), ob)))
                    r[f"torch_split_{name}"] = {"ms": round(ms, 4), "tflops": round(fl / ms / 1e9, 1)}
        except Exception as e:
            r["steps_error"] = repr(e)[:300]
        if T == max(tokens):  # equal-sized groups: the grouped GEMMs' best case
            m = M // E
            xa = torch.randn(E, m, H, device=DEV, dtype=gate_up.dtype)
            ms = bench(lambda: torch.bmm(xa, gate_up.transpose(1, 2)))
            r["bmm_equal_gate_up"] = {"ms": round(ms, 4), "tflops": round(2 * E * m * H * 2 * I / ms / 1e9, 1)}
            ha = torch.randn(E, m, I, device=DEV, dtype=gate_up.dtype)
            ms = bench(lambda: torch.bmm(ha, down.transpose(1, 2)))
            r["bmm_equal_down"] = {"ms": round(ms, 4), "tflops": round(2 * E * m * I * H / ms / 1e9, 1)}
        print(f"T={T}: " + ", ".join(f"{p} {r[p].get('ms')} ms {r[p].get('tflops')} TF/s" for p in PATHS), flush=True)
    del gate_up, down
    torch.cuda.empty_cache()


def model_section(res: dict) -> None:
    """The 8-layer slice's 8K prefill (gpu_model.py) with each experts path (env switch per call)."""
    sys.path.insert(0, os.path.dirname(__file__))
    import gpu_model as gm

    from qwen3next.forward_batch import ForwardBatch

    ours, _ = gm.build_models(with_hf=False)
    T = 8192
    cache = gm.make_cache(ours, 2, T // gm.BS + 1)
    ids = torch.randint(0, gm.DIMS["vocab_size"], (T,), device=DEV)
    pos = torch.arange(T, device=DEV)
    fb = ForwardBatch(cu_seqlens=torch.tensor([0, T], device=DEV), seq_lens=[T], context_lens=[0], cache=cache,
                      block_tables=torch.arange(T // gm.BS + 1, device=DEV)[None],
                      slot_mapping=torch.arange(T, device=DEV), state_slots=torch.tensor([0], device=DEV))

    def step():
        with torch.inference_mode():
            return ours.compute_logits(ours(ids, pos, fb)[-1:])

    logits = {}
    for p in ("off",) + PATHS[1:]:
        os.environ["QWEN3NEXT_MOE_SORTED"] = p
        try:
            logits[p] = step().float()
            res[f"prefill_8k_{p}_ms"] = round(gm.timed(step, reps=10, warmup=2), 3)
            res[f"prefill_8k_{p}_rel_err_vs_off"] = rel(logits[p], logits["off"])
        except Exception as e:
            res[f"prefill_8k_{p}_error"] = repr(e)[:300]
        print(p, res.get(f"prefill_8k_{p}_ms"), flush=True)
    os.environ.pop("QWEN3NEXT_MOE_SORTED")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="moe_prefill.json")
    ap.add_argument("--tokens", default="8192,4096,2048,1024")
    ap.add_argument("--model", action="store_true", help="also the 8-layer model's 8K prefill per path")
    ap.add_argument("--check-compile", action="store_true")
    a = ap.parse_args()
    if a.check_compile:
        return check_compile()
    res = {"env": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}

    def save():
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)

    try:
        experts_section(sorted((int(t) for t in a.tokens.split(",")), reverse=True), res.setdefault("experts", {}))
    finally:
        save()
    if a.model:
        try:
            model_section(res.setdefault("model", {}))
        finally:
            save()
    print(json.dumps(res, indent=1)[-6000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
