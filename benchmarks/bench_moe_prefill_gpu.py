"""Prefill MoE experts on one GPU: the Triton grouped GEMM over gathered, padded rows (triton/moe.py)
against the expert-sorted path (triton/moe_grouped.py) with torch._grouped_mm or moe_tma.py's TMA
kernels as its GEMMs, at the 80B's expert shapes (512 experts top-10, hidden 2048, intermediate
512), bf16, uniform random routing.

    python benchmarks/bench_moe_prefill_gpu.py --out moe_prefill.json [--tokens 8192,2048] [--paths ...]
        [--fp8] [--model] [--model-variants default,persistent_mixed] [--pin] [--skip-probe]
    PYTHONPATH=.:/tmp/tri36 python benchmarks/bench_moe_prefill_gpu.py --check-compile   # no GPU needed

Per token count: each path's whole experts call (ms, TFLOP/s over the routed FLOPs; --fp8: also
moe_tma_fp8 with persistent GEMMs off / down / all), the GEMMs one by one (one-tile-per-program vs
persistent, torch's down, unsort-sum with and without the gated add), errors against triton_gather
(and the torch reference at the smallest size), every persistent config alone at the largest size; a
probe of equal groups (64- vs 128-row tiles, persistent, persistent_mixed's 128 + 64-row tiles, resident's
whole experts). The GEMMs alone and the config sweeps cover the kernels of the paths asked for. `--model` times the 8-layer model's 8K prefill
(benchmarks/gpu_model.py's slice) under the session-4 dispatch, each change alone and the default,
wall and CUDA-graph replay, interleaved rounds (with --fp8 the same model quantised in place after).
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
PATHS = ("old", "torch", "triton", "triton_gather", "gather_torch", "persistent", "persistent_mixed", "resident")
# --model's bf16 ones (persistent_mixed_up: the mixed gate/up with the 64-row persistent down)
MODEL_VARIANTS = ("session4", "fold", "persistent", "default", "persistent_mixed", "persistent_mixed_up", "resident",
                  "resident_down")
DEV = "cuda"


def check_compile(only: str = "") -> int:
    """Compile the new kernels for sm_90 with the installed triton (specialised as at run time), with
    ptxas's register / spill report for the persistent ones (bf16 and moe_tma_fp8's); `only`: just the
    kernels whose check names contain it."""
    import re

    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor

    from benchmarks.sm90 import ptxas_report as regs
    from qwen3next.kernels.triton import moe_grouped as g
    from qwen3next.kernels.triton import moe_resident as rs
    from qwen3next.kernels.triton import moe_tma as t
    from qwen3next.kernels.triton import moe_tma_fp8 as f8

    print("triton", triton.__version__)
    fails = []

    def comp(name, fn, sig, const, warps=4, stages=3, nospec=(), report=False):
        if only not in name:
            return
        fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)
                 if sig[n].startswith("*") or (sig[n] == "i32" and n not in nospec)}
        try:
            k = triton.compile(ASTSource(fn, sig, const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps, "num_stages": stages})
            ptx = k.asm.get("ptx", "")
            rep = regs(ptx) if report else ""
            ok = (k.metadata.shared <= 232448 and ("wgmma" in ptx or not report)
                  and not re.search(r"[1-9]\d* bytes spill stores", rep))
            print("ok  " if ok else "BAD ", name, const, warps, stages, f"smem {k.metadata.shared} wgmma {'wgmma' in ptx}",
                  rep, flush=True)
            if not ok:
                fails.append(f"{name} {const}")
        except Exception as e:
            fails.append(name)
            print("FAIL", name, const, str(e).splitlines()[0][:200], flush=True)

    b, i64, i32 = "*bf16", "*i64", "i32"
    for copy in (True, False):
        comp("sort_rows", g._sort_rows_kernel, dict(ids_ptr=i64, rank_ptr=i64, end_ptr=i64, cnt_ptr=i64, x_ptr=b,
             xs_ptr=b, pos_ptr=i64, src_ptr=i64, M=i32, H=i32), dict(TOPK=K, BA=16, BH=512, COPY=copy), nospec=("M",))
    comp("silu_mul", g._silu_mul_kernel, dict(gu_ptr=b, h_ptr=b, M=i32, I=i32, S=i32), dict(BR=16, BI=256),
         nospec=("M",))
    for gated in (False, True):
        comp("unsort_sum", g._unsort_sum_kernel, dict(y_ptr=b, pos_ptr=i64, w_ptr="*fp32", o_ptr=b, sh_ptr=b, s_ptr=b,
                                                      T=i32, H=i32, YS=i32), dict(TOPK=K, BH=1024, GATED=gated),
             nospec=("T",))
    comp("tiles", t._tiles_kernel, dict(cnt_ptr=i64, tile_ptr="*i32", E=i32, NT=i32), dict(BM=64, BE=512, BLK=32),
         nospec=("NT",))

    def desc(r, cols, dt=torch.bfloat16):
        return mangle_type(TensorDescriptor(torch.empty(1, 16, dtype=dt), [1, 16], [16, 1], [r, cols]))

    for name, fn, gather in (("tma_gate_up", t._gate_up_kernel, False), ("tma_gate_up", t._gate_up_kernel, True),
                             ("tma_down", t._down_kernel, None), ("persist_gate_up", t._gate_up_persistent_kernel, False),
                             ("persist_gate_up", t._gate_up_persistent_kernel, True),
                             ("persist_down", t._down_persistent_kernel, None)):
        persist = name.startswith("persist")
        for c in fn.configs:
            bm, bn, bk = c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]
            sig = {"a_desc": desc(bm, bk), "b_desc": desc(bn, bk), ("tile_ptr" if persist else "cnt_ptr"):
                   ("*i32" if persist else i64)}
            sig.update({"h_ptr": b, "x_ptr": b, "src_ptr": i64} if gather is not None else {"y_ptr": b})
            sig.update({"H": i32, "I": i32, "RB": i32} if persist else {"E": i32, "H": i32, "I": i32, "RB": i32})
            const = dict(**({} if persist else {"BE": 512}), **c.kwargs, **({} if gather is None else {"GATHER": gather}))
            comp(name, fn, sig, const, c.num_warps, c.num_stages, nospec=("RB",), report=persist)
    for c in t._gate_up_mixed_kernel.configs:  # two tile heights in one kernel: both branches' registers count
        kw = c.kwargs
        sig = dict(b_desc=desc(kw["BN"], kw["BK"]), tile_ptr="*i32", h_ptr=b, x_ptr=b, src_ptr=i64, H=i32, I=i32, RB=i32)
        comp("mixed_gate_up", t._gate_up_mixed_kernel, sig, dict(**kw), c.num_warps, c.num_stages, nospec=("RB",),
             report=True)
    for c in t._down_mixed_kernel.configs:
        kw = c.kwargs
        sig = dict(a_desc=desc(kw["BM"], kw["BK"]), as_desc=desc(kw["BM"] // 2, kw["BK"]), b_desc=desc(kw["BN"], kw["BK"]),
                   tile_ptr="*i32", y_ptr=b, H=i32, I=i32, RB=i32)
        comp("mixed_down", t._down_mixed_kernel, sig, dict(**kw), c.num_warps, c.num_stages, nospec=("RB",),
             report=True)
    for c in rs._gate_up_resident_kernel.configs:
        kw = c.kwargs
        sig = dict(b_desc=desc(kw["BN"], kw["BK"]), tile_ptr="*i32", h_ptr=b, x_ptr=b, src_ptr=i64, H=i32, I=i32, RB=i32)
        comp("resident_gate_up", rs._gate_up_resident_kernel, sig, dict(**kw), c.num_warps, c.num_stages,
             nospec=("RB",), report=True)
    for c in rs._down_resident_kernel.configs:
        kw = c.kwargs
        sig = dict(a_desc=desc(kw["SB"], kw["BK"]), as_desc=desc(2 * kw["SB"], kw["BK"]), b_desc=desc(kw["BN"], kw["BK"]),
                   tile_ptr="*i32", y_ptr=b, H=i32, I=i32, RB=i32)
        comp("resident_down", rs._down_resident_kernel, sig, dict(**kw), c.num_warps, c.num_stages, nospec=("RB",),
             report=True)
    f8t, f32 = "*fp8e4nv", "*fp32"
    for c in f8._gate_up_persistent_kernel.configs:
        kw = c.kwargs
        sig = dict(b_desc=desc(kw["BN"], kw["BK"], torch.float8_e4m3fn), tile_ptr="*i32", src_ptr=i64, x_ptr=f8t, xs_ptr=f32,
                   s_ptr=f32, h_ptr=f8t, hs_ptr=f32, H=i32, I=i32, RB=i32)
        comp("fp8_persist_gate_up", f8._gate_up_persistent_kernel, sig, dict(DT=tl.bfloat16, **kw), c.num_warps,
             c.num_stages, nospec=("RB",), report=True)
    for c in f8._down_persistent_kernel.configs:
        kw = c.kwargs
        sig = dict(a_desc=desc(kw["BM"], kw["BK"], torch.float8_e4m3fn), b_desc=desc(kw["BN"], kw["BK"], torch.float8_e4m3fn),
                   tile_ptr="*i32", hs_ptr=f32, s_ptr=f32, y_ptr=b, H=i32, I=i32, RB=i32)
        comp("fp8_persist_down", f8._down_persistent_kernel, sig, dict(**kw), c.num_warps, c.num_stages,
             nospec=("RB",), report=True)
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


# --pin: the winners of earlier H200 runs only (fewer compiles per call): session 4's gate/up at 160 / 40 rows
# per expert and down; session 5's persistent ones (BN, BK, warps, stages[, WS])
_PIN = {("moe_tma", "_gate_up_kernel"): {(64, 256, 64, 8, 3), (64, 128, 64, 4, 5), (64, 128, 64, 4, 4)},
        ("moe_tma", "_down_kernel"): {(64, 128, 64, 4, 4)},
        ("moe_tma", "_gate_up_persistent_kernel"): {(256, 64, 8, 3, True), (256, 32, 8, 4, True)},
        ("moe_tma", "_down_persistent_kernel"): {(256, 64, 8, 3, False), (128, 128, 8, 3, False)},
        ("moe_tma_fp8", "_gate_up_persistent_kernel"): {(128, 128, 8, 4, False), (128, 128, 8, 3, True),
                                                         (128, 128, 8, 4, True)},
        ("moe_tma_fp8", "_down_persistent_kernel"): {(128, 128, 4, 4, None), (256, 128, 8, 3, None)}}


def pin(res: dict) -> None:
    import importlib

    for (mod, name), keep in _PIN.items():
        kern = getattr(importlib.import_module(f"qwen3next.kernels.triton.{mod}"), name)
        persist = "persistent" in name

        def shape(c):
            kw = c.kwargs
            if persist:
                return (kw["BN"], kw["BK"], c.num_warps, c.num_stages, kw.get("WS"))
            return (kw["BM"], kw["BN"], kw["BK"], c.num_warps, c.num_stages)
        kern.configs = [c for c in kern.configs if shape(c) in keep]
        res[f"{mod}.{name}"] = [str(c) for c in kern.configs]


def balanced_probe(res: dict, gate_up, t, paths: tuple) -> None:
    """Gate/up (x gathered) over equal groups of 128 and 160 rows per expert, 64- against 128-row tiles:
    whether re-reading an expert's weights once per 64-row tile (L2 -> SM traffic) is what costs; then
    the persistent kernel (64-row tiles) and the mixed one (128 + 64)."""
    from triton import Config

    from qwen3next.kernels.triton import moe_grouped as g
    from qwen3next.kernels.triton import moe_resident as rs

    T = 16 * E  # 8192 tokens: 128 rows per expert at top-8, 160 at top-10
    for k in (8, 10):
        ids = (torch.arange(T, device=DEV)[:, None] * k + torch.arange(k, device=DEV)[None, :]) % E  # equal groups
        x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
        _, cnt, _, _, src = g.sort_rows(x, ids, E, copy=False)
        tiles = t.tile_table(cnt, T * k)
        kern = t._gate_up_kernel
        configs, cache = kern.configs, kern.cache
        fl = 2 * T * k * H * 2 * I
        out = res.setdefault(f"rows{T * k // E}", {})
        for shape in ((64, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3)):
            bm, bn, bk, w, st = shape
            kern.configs, kern.cache = [Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st,
                                               pre_hook=t._set_blocks)], {}
            try:
                ms = bench(lambda: t.gate_up(x, gate_up, cnt, src))
                out[str(shape)] = {"ms": round(ms, 4), "tflops": round(fl / ms / 1e9, 1)}
            except Exception as e:
                out[str(shape)] = repr(e)[:120]
        kern.configs, kern.cache = configs, cache
        ms = bench(lambda: t.gate_up(x, gate_up, cnt, src, tiles))
        out["persistent"] = {"ms": round(ms, 4), "tflops": round(fl / ms / 1e9, 1)}
        if "persistent_mixed" in paths:
            mtiles = t.tile_table(cnt, T * k, t.MIXED_BM)
            ms = bench(lambda: t.gate_up(x, gate_up, cnt, src, mtiles, mixed=True))
            out["persistent_mixed"] = {"ms": round(ms, 4), "tflops": round(fl / ms / 1e9, 1)}
        if "resident" in paths:
            rtiles = t.tile_table(cnt, T * k, rs.ROWS)
            ms = bench(lambda: rs.gate_up(x, gate_up, src, rtiles))
            out["resident"] = {"ms": round(ms, 4), "tflops": round(fl / ms / 1e9, 1)}
    print("balanced", res, flush=True)


def experts_section(tokens: list[int], res: dict, paths: tuple, fp8: bool, probe: bool = True) -> None:
    from qwen3next.kernels import fp8 as qf8
    from qwen3next.kernels import moe as ref
    from qwen3next.kernels.triton import moe as old
    from qwen3next.kernels.triton import moe_grouped as g
    from qwen3next.kernels.triton import moe_resident as rs
    from qwen3next.kernels.triton import moe_tma as t
    from qwen3next.kernels.triton import moe_tma_fp8 as tf8
    from qwen3next.kernels.triton.moe_fp8 import quantize_act

    gen = torch.Generator(device=DEV).manual_seed(0)
    gate_up = (torch.randn(E, 2 * I, H, device=DEV, generator=gen) * 0.02).bfloat16()
    down = (torch.randn(E, H, I, device=DEV, generator=gen) * 0.02).bfloat16()
    gu8, gus = qf8.quantize(gate_up) if fp8 else (None, None)
    dn8, dns = qf8.quantize(down) if fp8 else (None, None)
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = bench(lambda: a @ a)
    res["matmul_8192_tflops"] = round(2 * 8192**3 / ms / 1e9, 1)
    del a
    if probe:
        balanced_probe(res.setdefault("balanced", {}), gate_up, t, paths)
    for T in tokens:  # largest first: the old path's autotune key saturates at 4096 rows (tuned here at T*k)
        r = res.setdefault(f"T{T}", {})
        M = T * K
        fl_up, fl_down = 2 * M * H * 2 * I, 2 * M * I * H
        x = torch.randn(T, H, device=DEV, generator=gen).bfloat16()
        w, ids = ref.moe_route(torch.randn(T, E, device=DEV, generator=gen), K, True)
        outs = {}
        calls = {"old": lambda: old.moe_experts(x, gate_up, down, w, ids, gemv=False),
                 **{p: (lambda p=p: g.moe_experts_sorted(x, gate_up, down, w, ids, gemm=p)) for p in PATHS[1:]}}
        if fp8:
            for pers in ("", "down", "all"):
                calls[f"fp8_persistent_{pers}" if pers else "fp8_sorted"] = (
                    lambda pers=pers: tf8.moe_experts_sorted_fp8(x, gu8, gus, dn8, dns, w, ids, persistent=pers))
        for p in [p for p in calls if p in paths or p.startswith("fp8")]:
            try:
                outs[p] = calls[p]()
                ms = bench(calls[p])
                r[p] = {"ms": round(ms, 4), "tflops": round((fl_up + fl_down) / ms / 1e9, 1)}
            except Exception as e:  # record and go on: one call times everything
                r[p] = {"error": repr(e)[:300]}
        base = next((b for b in ("triton_gather", "persistent") if b in outs), "old")
        for p in outs:
            r[p][f"rel_err_vs_{base}"] = rel(outs[p], outs[base]) if base in outs else None
            r[p]["bitwise_vs_" + base] = bool(base in outs and torch.equal(outs[p], outs[base]))
        for p in ("fp8_persistent_down", "fp8_persistent_all"):
            if p in outs and "fp8_sorted" in outs:
                r[p]["rel_err_vs_fp8_sorted"] = rel(outs[p], outs["fp8_sorted"])
        if T == min(tokens):
            want = ref.moe_experts(x, gate_up, down, w, ids)
            for p in outs:
                r[p]["rel_err_vs_ref"] = rel(outs[p], want)
        # the sorted path's steps one by one
        try:
            _, cnt, offs, pos, src = g.sort_rows(x, ids, E, copy=False)
            r["sort_rows_nocopy_ms"] = round(bench(lambda: g.sort_rows(x, ids, E, copy=False)), 4)
            tiles = t.tile_table(cnt, M)
            mtiles = t.tile_table(cnt, M, t.MIXED_BM)
            rtiles = t.tile_table(cnt, M, rs.ROWS)
            r["tile_table_ms"] = round(bench(lambda: t.tile_table(cnt, M)), 4)
            h = t.gate_up(x, gate_up, cnt, src)
            y = t.down(h, down, cnt)
            r["unsort_sum_ms"] = round(bench(lambda: g.unsort_sum(y, pos, w, T)), 4)
            gated = (torch.randn(T, H, device=DEV, dtype=x.dtype), torch.randn(T, 1, device=DEV, dtype=x.dtype))
            r["unsort_sum_gated_ms"] = round(bench(lambda: g.unsort_sum(y, pos, w, T, gated)), 4)
            r["torch_gated_add_ms"] = round(bench(lambda: y[:T] + torch.sigmoid(gated[1]) * gated[0]), 4)
            r["unsort_gated_bitwise"] = bool(torch.equal(g.unsort_sum(y, pos, w, T, gated),
                                                         g.unsort_sum(y, pos, w, T) + torch.sigmoid(gated[1]) * gated[0]))
            # each GEMM alone: the one-tile kernels, then those of the paths asked for (name prefix -> path)
            need = {"persist": "persistent", "mixed": "persistent_mixed", "resident": "resident", "torch": "torch"}
            for name, fn, fl in (("gather_gate_up", lambda: t.gate_up(x, gate_up, cnt, src), fl_up),
                                 ("persist_gather_gate_up", lambda: t.gate_up(x, gate_up, cnt, src, tiles), fl_up),
                                 ("mixed_gate_up", lambda: t.gate_up(x, gate_up, cnt, src, mtiles, mixed=True), fl_up),
                                 ("triton_down", lambda: t.down(h, down, cnt), fl_down),
                                 ("persist_down", lambda: t.down(h, down, cnt, tiles), fl_down),
                                 ("mixed_down", lambda: t.down(h, down, cnt, mtiles, mixed=True), fl_down),
                                 ("resident_gate_up", lambda: rs.gate_up(x, gate_up, src, rtiles), fl_up),
                                 ("resident_down", lambda: rs.down(h, down, rtiles), fl_down),
                                 ("torch_down", lambda: torch._grouped_mm(h, down.transpose(1, 2), offs), fl_down)):
                if need.get(name.split("_")[0], "old") not in paths + ("old",):
                    continue
                ms = bench(fn)
                r[name] = {"ms": round(ms, 4), "tflops": round(fl / ms / 1e9, 1)}
            if "persistent" in paths:
                r["persist_gate_up_bitwise"] = bool(torch.equal(t.gate_up(x, gate_up, cnt, src, tiles), h))
                r["persist_down_bitwise"] = bool(torch.equal(t.down(h, down, cnt, tiles), y))
            if "persistent_mixed" in paths:
                r["mixed_gate_up_bitwise"] = bool(torch.equal(t.gate_up(x, gate_up, cnt, src, mtiles, mixed=True), h))
                r["mixed_down_bitwise"] = bool(torch.equal(t.down(h, down, cnt, mtiles, mixed=True), y))
            if "resident" in paths:  # against the one-tile kernels' h and y (themselves equal to persistent's)
                r["resident_gate_up_bitwise"] = bool(torch.equal(rs.gate_up(x, gate_up, src, rtiles), h))
                r["resident_down_bitwise"] = bool(torch.equal(rs.down(h, down, rtiles), y))
            if fp8:
                xq, xsc = quantize_act(x, 128)
                h8, hs8 = tf8.gate_up(xq, xsc, gu8, gus, cnt, src, x.dtype)
                for name, fn, fl in (
                        ("fp8_gate_up", lambda: tf8.gate_up(xq, xsc, gu8, gus, cnt, src, x.dtype), fl_up),
                        ("fp8_persist_gate_up", lambda: tf8.gate_up(xq, xsc, gu8, gus, cnt, src, x.dtype, tiles), fl_up),
                        ("fp8_down", lambda: tf8.down(h8, hs8, dn8, dns, cnt, x.dtype), fl_down),
                        ("fp8_persist_down", lambda: tf8.down(h8, hs8, dn8, dns, cnt, x.dtype, tiles), fl_down)):
                    ms = bench(fn)
                    r[name] = {"ms": round(ms, 4), "tflops": round(fl / ms / 1e9, 1)}
            r["tuned"] = {n: {str(k): str(v) for k, v in f.cache.items()}
                          for n, f in (("gate_up", t._gate_up_kernel), ("down", t._down_kernel),
                                       ("persist_gate_up", t._gate_up_persistent_kernel),
                                       ("mixed_gate_up", t._gate_up_mixed_kernel),
                                       ("persist_down", t._down_persistent_kernel),
                                       ("mixed_down", t._down_mixed_kernel),
                                       ("resident_gate_up", rs._gate_up_resident_kernel),
                                       ("resident_down", rs._down_resident_kernel),
                                       ("fp8_persist_gate_up", tf8._gate_up_persistent_kernel),
                                       ("fp8_persist_down", tf8._down_persistent_kernel))}
            if T == max(tokens):  # every persistent config alone (what the autotuner chose from)
                sw = [(t._gate_up_persistent_kernel, lambda: t.gate_up(x, gate_up, cnt, src, tiles)),
                      (t._down_persistent_kernel, lambda: t.down(h, down, cnt, tiles))] if "persistent" in paths else []
                if "persistent_mixed" in paths:
                    sw += [(t._gate_up_mixed_kernel, lambda: t.gate_up(x, gate_up, cnt, src, mtiles, mixed=True)),
                           (t._down_mixed_kernel, lambda: t.down(h, down, cnt, mtiles, mixed=True))]
                if "resident" in paths:
                    sw += [(rs._gate_up_resident_kernel, lambda: rs.gate_up(x, gate_up, src, rtiles)),
                           (rs._down_resident_kernel, lambda: rs.down(h, down, rtiles))]
                if fp8:
                    sw += [(tf8._gate_up_persistent_kernel, lambda: tf8.gate_up(xq, xsc, gu8, gus, cnt, src, x.dtype,
                                                                                tiles)),
                           (tf8._down_persistent_kernel, lambda: tf8.down(h8, hs8, dn8, dns, cnt, x.dtype, tiles))]
                r["persist_sweep_ms"] = sweep(sw)
        except Exception as e:
            r["steps_error"] = repr(e)[:300]
        print(f"T={T}: " + ", ".join(f"{p} {r[p].get('ms')} ms" for p in outs), flush=True)
        print({k: v for k, v in r.items() if isinstance(v, dict) and "ms" in v and k not in outs}, flush=True)
    del gate_up, down, gu8, dn8
    torch.cuda.empty_cache()


def model_section(res: dict, variants: dict, fp8_variants: dict) -> None:
    """The 8-layer slice's 8K prefill (gpu_model.py) under each variant ({name: {env var: value} or
    {(module, attribute): value}}), wall time and CUDA-graph replay, rounds interleaved; then (fp8
    variants) the same model quantised in place (layers/quant.py to_fp8_)."""
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

    def switch(sw: dict) -> dict:
        old = {}
        for key, v in sw.items():
            if isinstance(key, str):
                old[key] = os.environ.get(key)
                os.environ[key] = v
            else:
                old[key] = getattr(*key)
                setattr(*key, v)
        return old

    def restore(old: dict) -> None:
        for key, v in old.items():
            if isinstance(key, str) and v is None:
                os.environ.pop(key)
            elif isinstance(key, str):
                os.environ[key] = v
            else:
                setattr(*key, v)

    def graph_ms() -> float:
        return gm.graph_replay_ms(step, reps=20)

    def run(vs: dict, tag: str) -> None:
        logits, base = {}, next(iter(vs))
        for rnd in range(3):  # interleaved rounds: the spread between them is the noise
            for name, sw in vs.items():
                old = switch(sw)
                try:
                    logits[name] = step().float()
                    res.setdefault(f"{tag}{name}_ms", []).append(round(gm.timed(step, reps=20, warmup=2), 3))
                    if rnd < 2:
                        res.setdefault(f"{tag}{name}_graph_ms", []).append(round(graph_ms(), 3))
                    res[f"{tag}{name}_rel_err_vs_{base}"] = rel(logits[name], logits[base])
                except Exception as e:
                    res[f"{tag}{name}_error"] = repr(e)[:300]
                finally:
                    restore(old)
                print(tag + name, res.get(f"{tag}{name}_ms"), res.get(f"{tag}{name}_graph_ms"), flush=True)

    run(variants, "prefill_8k_")
    if fp8_variants:
        from qwen3next.layers.quant import to_fp8_

        to_fp8_(ours, (128, 128))
        torch.cuda.empty_cache()
        run(fp8_variants, "prefill_8k_fp8_")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="moe_prefill.json")
    ap.add_argument("--tokens", default="8192,4096,2048,1024", help="'' : no experts section")
    ap.add_argument("--model", action="store_true", help="also the 8-layer model's 8K prefill per path")
    ap.add_argument("--paths", default=",".join(PATHS), help="the experts section's paths, of " + ",".join(PATHS))
    ap.add_argument("--fp8", action="store_true", help="also moe_tma_fp8's sorted experts, persistent off / on")
    ap.add_argument("--pin", action="store_true", help="the kernels tune among earlier H200 winners only (_PIN)")
    ap.add_argument("--model-variants", default="", help="--model's bf16 variants, the baseline first, of (default "
                    "all) " + ",".join(MODEL_VARIANTS))
    ap.add_argument("--skip-probe", action="store_true", help="no equal-groups probe")
    ap.add_argument("--check-compile", action="store_true")
    ap.add_argument("--check-only", default="", help="--check-compile: only kernels whose names contain this")
    a = ap.parse_args()

    paths = tuple(a.paths.split(","))
    unknown = sorted(set(a.model_variants.split(",")) - set(MODEL_VARIANTS) - {""})
    if unknown:
        ap.error(f"--model-variants: unknown {unknown}")
    if a.check_compile:
        return check_compile(a.check_only)
    res = {"env": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}

    def save():
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)

    if a.pin:
        pin(res.setdefault("pinned", {}))
    tokens = sorted((int(t) for t in a.tokens.split(",") if t), reverse=True)
    try:
        if tokens:
            experts_section(tokens, res.setdefault("experts", {}), paths, a.fp8, not a.skip_probe)
    finally:
        save()
    if a.model:
        from qwen3next.kernels.triton import moe_grouped as g
        from qwen3next.kernels.triton import moe_tma_fp8 as tf8

        fold0 = {(g, "FOLD_GATED"): False}
        variants = {"session4": {"QWEN3NEXT_MOE_SORTED": "triton_gather", **fold0},  # the first: the baseline
                    "fold": {"QWEN3NEXT_MOE_SORTED": "triton_gather"}, "persistent": {"QWEN3NEXT_MOE_SORTED": "auto",
                                                                                       **fold0},
                    "default": {}, "persistent_mixed": {"QWEN3NEXT_MOE_SORTED": "persistent_mixed"},
                    "persistent_mixed_up": {"QWEN3NEXT_MOE_SORTED": "persistent_mixed", (g, "MIXED_DOWN"): False},
                    "resident": {"QWEN3NEXT_MOE_SORTED": "resident", (g, "RESIDENT_UP"): True},
                    "resident_down": {"QWEN3NEXT_MOE_SORTED": "resident", (g, "RESIDENT_UP"): False}}
        if a.model_variants:  # the first named is the baseline the logits are compared with
            variants = {v: variants[v] for v in a.model_variants.split(",")}
        fp8_variants = {"session4": {(tf8, "PERSISTENT"): "", **fold0}, "fold": {(tf8, "PERSISTENT"): ""},
                        "persistent_down": {(tf8, "PERSISTENT"): "down", **fold0},
                        "persistent_all": {(tf8, "PERSISTENT"): "all"}, "default": {}} if a.fp8 else {}
        try:
            model_section(res.setdefault("model", {}), variants, fp8_variants)
        finally:
            save()
    print(json.dumps(res, indent=1)[-6000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
