"""GPU kernel benchmark: our Triton kernels against fla (when installed) at Qwen3-Next-80B shapes.

    python benchmarks/gpu_kernels.py --out results.json [--quick]

Measures the device's ceilings first (device-to-device copy bandwidth counting read + write,
8192^3 bf16 matmul rate on random data), then: chunked gated delta rule at T = 4K and 32K (one
sequence, and 8 x 4K varlen) against fla.chunk_gated_delta_rule; the decode step at batch 1, 64,
256 (state traffic as a fraction of copy bandwidth) against fla.fused_recurrent_gated_delta_rule;
and our conv1d, norms, MoE and paged attention. Medians of triton.testing.do_bench (CUDA-graph
replay for decode). Every timed variant is also checked against a reference. Prints a table,
writes everything to JSON.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import platform
import time
import traceback

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from qwen3next.kernels import attention as ref_attn
from qwen3next.kernels import moe as ref_moe
from qwen3next.kernels.triton import attention as t_attn
from qwen3next.kernels.triton import conv1d as t_conv
from qwen3next.kernels.triton import delta_rule as t_dr
from qwen3next.kernels.triton import moe as t_moe
from qwen3next.kernels.triton import norm as t_norm
from qwen3next.kernels.triton.gdn_decode import _decode_kernel, gdn_decode

try:
    import fla
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
except ImportError:  # fla is optional: our figures are still measured
    fla = None

HK, HV, DK, DV, KCONV = 16, 32, 128, 128, 4
RESULTS: dict = {}
ROWS: list[str] = []


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30)) if torch.isfinite(a).all() else float("inf")


def bench(fn, graph: bool = False) -> float:
    """Median milliseconds."""
    if graph:
        try:
            return float(do_bench_cudagraph(fn, rep=200, return_mode="median"))
        except Exception as e:  # capture can fail for code with host syncs
            RESULTS.setdefault("graph_fallbacks", []).append(repr(e)[:200])
    return float(do_bench(fn, warmup=50, rep=300, return_mode="median"))


def row(name: str, ms: float, extra: str = "") -> None:
    ROWS.append(f"{name:<48} {ms * 1e3:>10.1f} us  {extra}")
    print(ROWS[-1], flush=True)


def ceilings() -> None:
    n = 1 << 30  # 1 GiB each way
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    RESULTS["copy_bw_GBps"] = 2 * n / ms / 1e6
    row("copy 1 GiB d2d", ms, f"{RESULTS['copy_bw_GBps']:.0f} GB/s (read+write)")
    del a, b
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: x @ y)
    RESULTS["bf16_matmul_TFLOPs"] = 2 * 8192**3 / ms / 1e9
    row("matmul 8192^3 bf16", ms, f"{RESULTS['bf16_matmul_TFLOPs']:.0f} TFLOP/s")


def prefill_inputs(lens):
    T = sum(lens)
    q = F.normalize(torch.randn(T, HK, DK, device="cuda"), dim=-1).mul(DK**-0.5).bfloat16()
    k = F.normalize(torch.randn(T, HK, DK, device="cuda"), dim=-1).bfloat16()
    v = torch.randn(T, HV, DV, device="cuda", dtype=torch.bfloat16)
    g = -F.softplus(torch.randn(T, HV, device="cuda") - 3.0)
    beta = torch.rand(T, HV, device="cuda")
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0)
    return q, k, v, g, beta, cu


def profile_kernels(fn) -> dict[str, float]:
    """Per-kernel device time (us) of one call, by kernel name."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            out[ev.key[:60]] = round(float(t), 1)
    return out


CASES = "T32768,8x4096,T4096"  # chunked delta rule cases (--cases)
VARIANTS: list[dict] = []  # --variants: chunked delta rule keyword sets instead of the list below
ALL_CASES = {"T32768": [32768], "8x4096": [4096] * 8, "T8192": [8192], "T4096": [4096]}


def chunked(quick: bool) -> None:
    cases = {n: v for n, v in ALL_CASES.items() if n in CASES.split(",")}
    # launch variants (gated_delta_rule_chunked keywords); the first is the default. Measured slower
    # (H200, session 4): state kernel with 2 / 4 stages, 16-wide state tiles on 2 stages, the key
    # rows in two halves (~1%), U / Kd inside the state loop, kkt on 2 / 4 warps (1.9x / 3.5x);
    # session 3: 64-wide / 8-warp state tiles. Session 5 (T = 32K): fuse_output 1874 us, state on
    # 8 warps 1818, fused kkt on 2 warps 1909, output pieces of 32 1630, output on 8 warps 1616
    # (default 1607); 16-wide fused-output tiles gave wrong results on the H200.
    variants = VARIANTS or [dict(), dict(fuse_wu=False, bk_out=128), dict(fuse_output=True), dict(bv_state=64)]
    for name, lens in cases.items():
        q, k, v, g, beta, cu = prefill_inputs(lens)
        B = len(lens)
        pool = torch.randn(B + 4, HV, DK, DV, device="cuda") * 0.02
        slots = torch.arange(B, device="cuda") + 2
        has = torch.ones(B, dtype=torch.bool, device="cuda")
        res: dict = {"tokens": sum(lens)}
        o_fla = None
        if fla is not None:
            h0 = pool[slots].contiguous()

            def run_fla():
                return chunk_gated_delta_rule(q[None], k[None], v[None], g[None], beta[None], scale=1.0,
                                              initial_state=h0, output_final_state=True, cu_seqlens=cu)

            o_fla, ht = run_fla()
            res["fla_ms"] = bench(run_fla)
            res["fla_profile_us"] = profile_kernels(run_fla)
            row(f"delta chunked {name} fla", res["fla_ms"])
        best = None
        RESULTS[f"chunked_{name}"] = res  # filled in as variants finish (a failing one keeps the rest)
        for kw in variants:
            key = "ours_" + ("_".join(f"{a}{int(b)}" for a, b in kw.items()) or "default")
            try:
                p = pool.clone()
                o = t_dr.gated_delta_rule_chunked(q, k, v, g, beta, cu, p, slots, has, **kw)
                torch.cuda.synchronize()
            except Exception as e:  # a compile failure: the next variant
                res[key + "_error"] = repr(e)[:300]
                print(key, "failed:", repr(e)[:300], flush=True)
                continue
            if o_fla is not None:
                res[key + "_relerr_vs_fla"] = rel(o, o_fla[0])
                res[key + "_state_relerr_vs_fla"] = rel(p[slots], ht)
            ms = bench(lambda: t_dr.gated_delta_rule_chunked(q, k, v, g, beta, cu, p, slots, has, **kw))
            res[key + "_ms"] = ms
            ratio = (f"fla/ours = {res['fla_ms'] / ms:.2f}, err vs fla {res[key + '_relerr_vs_fla']:.1e} "
                     f"(state {res[key + '_state_relerr_vs_fla']:.1e})" if "fla_ms" in res else "")
            row(f"delta chunked {name} ours {key[5:]}", ms, ratio)
            res[key + "_profile_us"] = profile_kernels(lambda: t_dr.gated_delta_rule_chunked(
                q, k, v, g, beta, cu, p, slots, has, **kw))
            if best is None or ms < res[best[0] + "_ms"]:
                best = (key, kw)
        res["best"] = best[0]
        if "fla_ms" in res:
            res["speedup_vs_fla"] = res["fla_ms"] / res[best[0] + "_ms"]
        res["ours_profile_us"] = profile_kernels(lambda: t_dr.gated_delta_rule_chunked(
            q, k, v, g, beta, cu, pool, slots, has, **best[1]))
        del q, k, v, g, beta, pool
        torch.cuda.empty_cache()


def decode(quick: bool) -> None:
    C = 2 * HK * DK + HV * DV
    state_bytes = HV * DK * DV * 4
    for B in (1, 64, 256):
        # enough layers of state that the timed set is well past L2 (a real step walks 36 layers)
        L = max(1, math.ceil((512 << 20) / (B * state_bytes)))
        N = B + 1
        pools = [torch.randn(N, HV, DK, DV, device="cuda") * 0.02 for _ in range(L)]
        convs = [torch.randn(N, C, KCONV - 1, device="cuda", dtype=torch.bfloat16) for _ in range(L)]
        m = torch.randn(B, C, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(B, HV, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(B, HV, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(C, KCONV, device="cuda", dtype=torch.bfloat16)
        A_log, dt_bias = torch.randn(HV, device="cuda"), torch.randn(HV, device="cuda")
        slots = torch.randperm(N, device="cuda")[:B]
        traffic = 2 * B * state_bytes  # state read + written once
        res: dict = {"layers_cycled": L, "state_bytes_per_call": traffic}
        variants = [(64, 4), (32, 2), (32, 4), (64, 2), (16, 4), (16, 2)] if not quick else (
            [(64, 4), (32, 4), (16, 4), (16, 2)] if B == 1 else [(64, 4)])
        for bv, nw in variants:
            def run(bv=bv, nw=nw):
                for i in range(L):
                    gdn_decode(m, a, b, w, convs[i], pools[i], slots, A_log, dt_bias, HK, bv=bv, num_warps=nw)
            ms = bench(run, graph=True) / L
            frac = traffic / ms / 1e6 / RESULTS["copy_bw_GBps"]
            res[f"ours_full_bv{bv}_w{nw}_ms"] = ms
            res[f"ours_full_bv{bv}_w{nw}_bw_frac"] = frac
            row(f"decode B={B} ours (conv+recurrent) bv={bv} w={nw}", ms, f"state traffic {frac:.0%} of copy bw")
        # the recurrence kernel alone (conv output precomputed), best variant above
        best = min((k for k in res if k.startswith("ours_full") and k.endswith("_ms")), key=lambda k: res[k])
        bv, nw = int(best.split("_")[2][2:]), int(best.split("_")[3][1:])
        mc = torch.randn(B, C, device="cuda", dtype=torch.bfloat16)

        out = torch.empty(B, HV, DV, device="cuda", dtype=torch.bfloat16)

        def run_core():
            for i in range(L):
                _decode_kernel[(triton.cdiv(DV, bv), B * HV)](mc, a, b, A_log, dt_bias, pools[i], slots, out,
                                                               DK**-0.5, HK=HK, HV=HV, DK=DK, DV=DV, BV=bv, num_warps=nw)
        ms = bench(run_core, graph=True) / L
        res["ours_core_ms"] = ms
        res["ours_core_bw_frac"] = traffic / ms / 1e6 / RESULTS["copy_bw_GBps"]
        row(f"decode B={B} ours recurrence only bv={bv} w={nw}", ms, f"state traffic {res['ours_core_bw_frac']:.0%}")
        if fla is not None:
            q = torch.randn(B, 1, HK, DK, device="cuda", dtype=torch.bfloat16)
            kk = torch.randn(B, 1, HK, DK, device="cuda", dtype=torch.bfloat16)
            vv = torch.randn(B, 1, HV, DV, device="cuda", dtype=torch.bfloat16)
            h0s = [p[:B].contiguous() for p in pools]

            def run_fla():
                for i in range(L):
                    fused_recurrent_gated_delta_rule(q, kk, vv, a[:, None], beta=b[:, None], scale=DK**-0.5,
                                                     initial_state=h0s[i], output_final_state=True,
                                                     use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                                                     A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True)
            ms = bench(run_fla, graph=True) / L
            res["fla_ms"] = ms
            res["fla_bw_frac"] = traffic / ms / 1e6 / RESULTS["copy_bw_GBps"]
            res["speedup_core_vs_fla"] = ms / res["ours_core_ms"]
            row(f"decode B={B} fla fused_recurrent (gates+l2 in kernel)", ms, f"state traffic {res['fla_bw_frac']:.0%}")
        RESULTS[f"decode_B{B}"] = res
        del pools, convs
        torch.cuda.empty_cache()


def others(quick: bool) -> None:
    res: dict = {}
    # conv1d prefill over 8K tokens of the 8192 conv channels, and the update at B=256
    C = 2 * HK * DK + HV * DV
    x = torch.randn(8192, C, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(C, KCONV, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 4096, 8192], device="cuda")
    st = torch.randn(4, C, KCONV - 1, device="cuda", dtype=torch.bfloat16)
    sl, has = torch.tensor([1, 2], device="cuda"), torch.tensor([True, False], device="cuda")
    res["conv_varlen_8k_ms"] = bench(lambda: t_conv.causal_conv1d_varlen(x, w, cu, st, sl, has))
    gbps = 2 * x.numel() * 2 / res["conv_varlen_8k_ms"] / 1e6
    row("conv1d varlen 2x4096 x 8192ch", res["conv_varlen_8k_ms"], f"{gbps:.0f} GB/s")
    # norms over 8K tokens of width 2048
    h = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(h)
    nw = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    res["zc_rmsnorm_residual_8k_ms"] = bench(lambda: t_norm.zc_rmsnorm(h, nw, 1e-6, residual=r))
    row("zc_rmsnorm+residual 8192x2048", res["zc_rmsnorm_residual_8k_ms"],
        f"{4 * h.numel() * 2 / res['zc_rmsnorm_residual_8k_ms'] / 1e6:.0f} GB/s")
    # MoE at 80B shapes
    E, H, I, k = 512, 2048, 512, 10
    gu = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02
    dn = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.02
    for T in (1, 4, 8, 16, 64, 4096):
        xm = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
        wts, ids = t_moe.moe_route(logits, k, True)
        y = t_moe.moe_experts(xm, gu, dn, wts, ids)
        err = rel(y, ref_moe.moe_experts(xm, gu, dn, wts, ids))
        if T <= 64:
            # 8 routings per timed call (8 layers' worth of distinct experts: past L2), both paths
            sets = [t_moe.moe_route(torch.randn(T, E, device="cuda"), k, True) for _ in range(8)]
            for path in ("gemv", "grouped"):
                if path == "gemv" and T * k > 4 * t_moe.GEMV_MAX_ROWS:
                    continue
                def run8(g=(path == "gemv")):
                    for w8, i8 in sets:
                        t_moe.moe_experts(xm, gu, dn, w8, i8, gemv=g)
                ms8 = bench(run8, graph=True) / 8
                act = sum(int(torch.unique(i8).numel()) for _, i8 in sets) / 8
                res[f"moe_T{T}_{path}_ms"] = ms8
                row(f"moe experts T={T} {path} ({act:.0f} experts, 8 routings)", ms8,
                    f"{act * 3 * I * H * 2 / ms8 / 1e6:.0f} GB/s weights")
            res[f"moe_T{T}_profile_us"] = profile_kernels(lambda: t_moe.moe_experts(xm, gu, dn, wts, ids))
            res[f"moe_T{T}_relerr"] = err
            continue
        ms = bench(lambda: t_moe.moe_experts(xm, gu, dn, wts, ids), graph=(T == 1))
        res[f"moe_T{T}_profile_us"] = profile_kernels(lambda: t_moe.moe_experts(xm, gu, dn, wts, ids))
        active = int(torch.unique(ids).numel())
        wbytes = active * 3 * I * H * 2
        flops = 2 * T * k * 3 * I * H
        res[f"moe_T{T}_ms"], res[f"moe_T{T}_relerr"] = ms, err
        row(f"moe experts T={T} ({active} experts)", ms,
            f"{wbytes / ms / 1e6:.0f} GB/s weights, {flops / ms / 1e9:.0f} TFLOP/s, err {err:.1e}")
        ms_ref = bench(lambda: ref_moe.moe_experts(xm, gu, dn, wts, ids))
        res[f"moe_T{T}_reference_ms"] = ms_ref
        row(f"moe experts T={T} torch reference", ms_ref)
    res["moe_route_T4096_ms"] = bench(lambda: t_moe.moe_route(logits, k, True))
    row("moe route T=4096", res["moe_route_T4096_ms"])
    l1 = torch.randn(1, E, device="cuda", dtype=torch.bfloat16)
    res["moe_route_T1_ms"] = bench(lambda: t_moe.moe_route(l1, k, True), graph=True)
    row("moe route T=1", res["moe_route_T1_ms"])
    # per-head norm of a strided query view and the rotary, 8K tokens x 16 heads x 256 (attention)
    qg = torch.randn(8192, 16, 512, device="cuda", dtype=torch.bfloat16)
    qw = torch.randn(256, device="cuda", dtype=torch.bfloat16) * 0.1
    res["qnorm_strided_8k_ms"] = bench(lambda: t_norm.zc_rmsnorm(qg[..., :256], qw, 1e-6))
    row("zc_rmsnorm q heads (strided view) 8192x16x256", res["qnorm_strided_8k_ms"],
        f"{2 * 8192 * 16 * 256 * 2 / res['qnorm_strided_8k_ms'] / 1e6:.0f} GB/s")
    from qwen3next.kernels import rotary as ref_rot
    from qwen3next.kernels.triton import rotary as t_rot
    qn = torch.randn(8192, 16, 256, device="cuda", dtype=torch.bfloat16)
    cs, sn = torch.randn(8192, 64, device="cuda", dtype=torch.bfloat16), torch.randn(8192, 64, device="cuda", dtype=torch.bfloat16)
    res["rotary_8k_ms"] = bench(lambda: t_rot.apply_rotary(qn, cs, sn))
    res["rotary_8k_torch_ms"] = bench(lambda: ref_rot.apply_rotary(qn, cs, sn))
    res["rotary_8k_relerr"] = rel(t_rot.apply_rotary(qn, cs, sn), ref_rot.apply_rotary(qn, cs, sn))
    row("rotary 8192x16x256 (d=64)", res["rotary_8k_ms"], f"torch {res['rotary_8k_torch_ms'] * 1e3:.0f} us")
    xo, zo = torch.randn(8192, 32, 128, device="cuda", dtype=torch.bfloat16), torch.randn(8192, 32, 128, device="cuda", dtype=torch.bfloat16)
    wo = torch.randn(128, device="cuda", dtype=torch.bfloat16)
    res["gated_rmsnorm_8k_ms"] = bench(lambda: t_norm.gated_rmsnorm(xo, zo, wo, 1e-6))
    row("gated_rmsnorm 8192x32x128", res["gated_rmsnorm_8k_ms"],
        f"{3 * xo.numel() * 2 / res['gated_rmsnorm_8k_ms'] / 1e6:.0f} GB/s")
    # paged attention: 16 q heads, 2 kv heads, D 256, block 16
    HQ, HKV, D, BS = 16, 2, 256, 16
    for name, ctx, new in (("prefill_4k", [0], [4096]), ("prefill_1k_on_7k", [7168], [1024]),
                           ("decode_B64_ctx4k", [4096] * 64, [1] * 64), ("decode_B1_ctx32k", [32768], [1])):
        B = len(ctx)
        per = [-(-(c + n) // BS) for c, n in zip(ctx, new)]
        kv = torch.randn(sum(per), 2, BS, HKV, D, device="cuda", dtype=torch.bfloat16)
        bt = torch.zeros(B, max(per), dtype=torch.long, device="cuda")
        perm = torch.randperm(sum(per), device="cuda")
        o = 0
        for i, p in enumerate(per):
            bt[i, :p] = perm[o : o + p]
            o += p
        q = torch.randn(sum(new), HQ, D, device="cuda", dtype=torch.bfloat16)
        cuq = torch.tensor([0] + new, device="cuda").cumsum(0)
        cl = torch.tensor(ctx, device="cuda")
        out = t_attn.paged_attention(q, kv, bt, cuq, cl, D**-0.5)
        err = rel(out, ref_attn.paged_attention(q, kv, bt, cuq, cl, D**-0.5))
        ms = bench(lambda: t_attn.paged_attention(q, kv, bt, cuq, cl, D**-0.5), graph=name.startswith("decode"))
        kvbytes = sum(c + n for c, n in zip(ctx, new)) * 2 * HKV * D * 2
        flops = sum(4 * n * (c + (n + 1) / 2) * HQ * D for c, n in zip(ctx, new))
        res[f"attn_{name}_ms"], res[f"attn_{name}_relerr"] = ms, err
        row(f"paged attention {name}", ms,
            f"{kvbytes / ms / 1e6:.0f} GB/s kv, {flops / ms / 1e9:.0f} TFLOP/s, err {err:.1e}")
        if name.startswith("prefill"):
            def sdpa():
                kk = kv[bt[0, : per[0]], 0].reshape(-1, HKV, D)[: ctx[0] + new[0]].transpose(0, 1)
                vv = kv[bt[0, : per[0]], 1].reshape(-1, HKV, D)[: ctx[0] + new[0]].transpose(0, 1)
                return F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, enable_gqa=True,
                                                      is_causal=ctx[0] == 0)
            try:
                res[f"attn_{name}_sdpa_ms"] = bench(sdpa)
                row(f"  torch sdpa (gather + flash) {name}", res[f"attn_{name}_sdpa_ms"])
            except Exception as e:
                res[f"attn_{name}_sdpa_error"] = repr(e)[:200]
    RESULTS["others"] = res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_kernels.json")
    ap.add_argument("--quick", action="store_true", help="one decode variant")
    ap.add_argument("--only", default="ceilings,chunked,decode,others")
    ap.add_argument("--cases", default="T32768,8x4096,T4096", help="chunked delta rule cases")
    ap.add_argument("--variants", default="", help="chunked delta rule variants, e.g. \"[{}, {'bv_state': 64}]\"")
    args = ap.parse_args()
    global CASES  # noqa: PLW0603
    CASES = args.cases
    VARIANTS.extend(ast.literal_eval(args.variants) if args.variants else [])
    RESULTS["meta"] = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "fla": getattr(fla, "__version__", None), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(RESULTS["meta"], flush=True)
    t0 = time.time()
    parts = args.only.split(",")
    ceilings()  # the fractions below need the copy bandwidth
    for name, fn in (("chunked", chunked), ("decode", decode), ("others", others)):
        if name in parts:
            try:
                fn(args.quick)
            except Exception as e:  # keep the other sections' figures
                RESULTS[f"{name}_error"] = repr(e)[:500]
                traceback.print_exc()
            with open(args.out, "w") as f:
                json.dump(RESULTS, f, indent=1)
    RESULTS["meta"]["bench_s"] = round(time.time() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(RESULTS, f, indent=1)
    print("\n".join(["", "summary:"] + ROWS))


if __name__ == "__main__":
    main()
