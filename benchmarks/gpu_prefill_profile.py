"""Where the 8K prefill's wall time goes beyond its kernels (issue #5): host syncs, GPU idle gaps,
the torch elementwise / copy kernels, wall vs kernel sum. The 80B slice of benchmarks/gpu_model.py
(its dimensions, random weights, cache and step), built directly (no transformers model).

    python benchmarks/gpu_prefill_profile.py --out-dir $OUT [--variants base,new] [--reps 10]
    python benchmarks/gpu_prefill_profile.py --out-dir $OUT --quick --variants new,stream   # streaming conv A/B
    python benchmarks/gpu_prefill_profile.py --out-dir $OUT --quick --no-conv --variants stream,gnorm  # fused gated norm

Per variant (a named set of module switches, applied in one process on the same weights):
  wall_ms      median of `reps` prefills, each alone on the device (gpu_model.timed: host included)
  host_ms      the Python time of one prefill call before its first sync (launch cost)
  graph_ms     the same prefill replayed from a CUDA graph (no launch gaps), or why capture failed
  kernels      the profiler's kernel sum per call and the top kernels
  gaps         GPU idle gaps > --gap-us between consecutive device activities, each with the CPU op /
               Python frames around the next launch and the slow runtime calls before it
  glue         every torch elementwise / copy / fill kernel with its aten op chain and input shapes
  syncs        (first variant) the sync warnings of torch.cuda.set_sync_debug_mode("warn"), with stacks
Files under --out-dir: prefill_profile.json, trace_<variant>.json (chrome trace of the profiled calls).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_model as gm  # noqa: E402  (the slice's dimensions, weights and helpers)

from qwen3next.forward_batch import ForwardBatch  # noqa: E402

T = 8192
RES: dict = {}
# name -> {"module.attr": value}: the variants this script can A/B in one process
_GROUPED, _SPLIT = "qwen3next.layers.gated_deltanet.GROUPED_MAX_T", "qwen3next.kernels.triton.conv1d.SPLIT_STATE"
_STREAM = "qwen3next.kernels.triton.conv1d.STREAM"
_GNORM = "qwen3next.kernels.triton.gdn_prep.NORM_FUSED"
VARIANTS = {
    # session 4's path: q / k / v copied for the conv above 512 tokens, the conv in one launch
    "base": {_GROUPED: 512, _SPLIT: False, _STREAM: False, _GNORM: False},
    # the grouped projection read in place by the conv at any length (session 5)
    "new": {_GROUPED: 1 << 40, _SPLIT: False, _STREAM: False, _GNORM: False},
    # + the conv's state rows in a second launch (the main one without the state path's registers)
    "split": {_GROUPED: 1 << 40, _SPLIT: True, _STREAM: False, _GNORM: False},
    # "new" with the streaming conv (conv1d.STREAM, its STREAM_CFG: --stream-cfg sets it)
    "stream": {_GROUPED: 1 << 40, _SPLIT: False, _STREAM: True, _GNORM: False},
    # "stream" with the DeltaNet's gated norm in the delta rule's output kernel (session 6)
    "gnorm": {_GROUPED: 1 << 40, _SPLIT: False, _STREAM: True, _GNORM: True},
}


def make_step(model):
    """gpu_model.prefill_ours's step: one 8K prompt through the cached path, last token's logits."""
    cache = gm.make_cache(model, 2, T // gm.BS + 1)
    ids = torch.randint(0, gm.DIMS["vocab_size"], (T,), device="cuda")
    pos = torch.arange(T, device="cuda")

    fb = ForwardBatch(cu_seqlens=torch.tensor([0, T], device="cuda"), seq_lens=[T], context_lens=[0],
                      cache=cache, block_tables=torch.arange(T // gm.BS + 1, device="cuda")[None],
                      slot_mapping=torch.arange(T, device="cuda"), state_slots=torch.tensor([0], device="cuda"))

    def step():
        with torch.inference_mode():
            return model.compute_logits(model(ids, pos, fb)[-1:])

    return step


def apply_variant(name: str) -> dict:
    """Sets the variant's switches -> the previous values (to restore)."""
    import importlib

    old = {}
    for path, value in VARIANTS[name].items():
        mod, attr = path.rsplit(".", 1)
        m = importlib.import_module(mod)
        old[path] = getattr(m, attr)
        setattr(m, attr, value)
    return old


def restore(old: dict) -> None:
    import importlib

    for path, value in old.items():
        mod, attr = path.rsplit(".", 1)
        setattr(importlib.import_module(mod), attr, value)


# ---- (a) host syncs ------------------------------------------------------------------------
def find_syncs(step) -> list:
    """Every synchronising CUDA call of one prefill, as warned by the sync debug mode."""
    found = []
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename]
        ours = [f"{os.path.relpath(f.filename, here)}:{f.lineno} {f.name}" for f in frames
                if f.filename.startswith(here)]
        found.append({"message": str(message)[:200], "at": f"{filename}:{lineno}", "stack": ours[-8:]})

    torch.cuda.synchronize()
    prev = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = prev
    torch.cuda.synchronize()
    return found


# ---- (b, c) profiler: idle gaps and glue kernels ----------------------------------------------
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def profile_trace(step, path: str, calls: int = 3, with_stack: bool = True) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True,
                 with_stack=with_stack) as prof:
        for _ in range(calls):
            with torch.profiler.record_function("prefill_call"):
                step()
            torch.cuda.synchronize()
    prof.export_chrome_trace(path)
    with open(path) as f:
        return json.load(f)


def _enclosing(cpu_by_tid: dict, tid, ts: float) -> list:
    """Names of the CPU ops / Python frames on thread `tid` open at time ts, outermost first."""
    out = []
    for e in cpu_by_tid.get(tid, ()):
        if e["ts"] <= ts <= e["ts"] + e.get("dur", 0):
            out.append(e)
    out.sort(key=lambda e: e["ts"])
    return out


def analyse(trace: dict, calls: int, gap_us: float) -> dict:
    ev = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    dev = sorted((e for e in ev if e.get("cat") in DEVICE_CATS), key=lambda e: e["ts"])
    runtime = {e["args"]["correlation"]: e for e in ev
               if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    rt_sorted = sorted((e for e in ev if e.get("cat") in ("cuda_runtime", "cuda_driver")), key=lambda e: e["ts"])
    cpu_by_tid: dict = {}
    for e in ev:
        if e.get("cat") in ("cpu_op", "python_function", "user_annotation"):
            cpu_by_tid.setdefault(e["tid"], []).append(e)
    kernel_sum = sum(e["dur"] for e in dev if e.get("cat") == "kernel")
    calls_cpu = sorted((e for e in ev if e.get("cat") == "user_annotation" and e["name"] == "prefill_call"),
                       key=lambda e: e["ts"])
    gaps, idle, spans = [], 0.0, []
    for c in calls_cpu:
        # this call's device work: what its thread launched between the call's start and end
        mine = [e for e in dev if (r := runtime.get(e.get("args", {}).get("correlation"))) is not None
                and c["ts"] <= r["ts"] <= c["ts"] + c["dur"]]
        if not mine:
            continue
        span = mine[-1]["ts"] + mine[-1]["dur"] - c["ts"]
        end_busy, busy = c["ts"], 0.0
        prev_name = "(call start)"
        for b in mine:
            g = b["ts"] - end_busy
            if g > gap_us:
                launch = runtime.get(b["args"]["correlation"])
                row = {"gap_us": round(g, 1), "after": prev_name[:80], "before": b["name"][:80],
                       "launch_lag_us": round(launch["ts"] - end_busy, 1), "launch_call": launch["name"]}
                stack = _enclosing(cpu_by_tid, launch["tid"], launch["ts"])
                row["cpu_ops"] = [x["name"][:100] for x in stack if x.get("cat") == "cpu_op"][-4:]
                row["py"] = [x["name"][:100] for x in stack if x.get("cat") == "python_function"][-10:]
                # slow runtime calls on the launching thread while the device sat idle
                row["slow_runtime"] = [f"{r['name']} {round(r['dur'], 1)}us" for r in rt_sorted
                                       if end_busy - 50 <= r["ts"] <= launch["ts"] and r.get("dur", 0) > 10
                                       and r is not launch][:6]
                gaps.append(row)
            busy += max(0.0, b["ts"] + b["dur"] - max(b["ts"], end_busy))
            if b["ts"] + b["dur"] > end_busy:
                end_busy, prev_name = b["ts"] + b["dur"], b["name"]
        idle += span - busy
        spans.append(round(span, 1))
    big = sorted(gaps, key=lambda r: -r["gap_us"])
    total_gap = sum(r["gap_us"] for r in gaps)
    # (c) elementwise / copy / fill kernels with the aten op chain that launched them
    glue: dict = {}
    for e in dev:
        n = e["name"]
        if not any(s in n for s in ("elementwise", "copy", "fill", "Memset", "Memcpy", "reduce_kernel", "index",
                                    "cat", "CatArray")):
            continue
        launch = runtime.get(e.get("args", {}).get("correlation"))
        chain, dims = [], None
        if launch is not None:
            stack = _enclosing(cpu_by_tid, launch["tid"], launch["ts"])
            ops = [s for s in stack if s.get("cat") == "cpu_op"]
            chain = [s["name"] for s in ops][-3:]
            if ops:
                dims = ops[-1].get("args", {}).get("Input Dims")
            py = [s["name"] for s in stack if s.get("cat") == "python_function" and "qwen3next" in s["name"]]
            chain = (py[-1:] if py else []) + chain
        key = f"{n[:60]} | {' > '.join(chain)} | {dims}"
        g = glue.setdefault(key, {"us": 0.0, "n": 0})
        g["us"] += e["dur"] / calls
        g["n"] += 1
    glue_rows = sorted(({"kernel": k, "us_per_call": round(v["us"], 1), "launches_per_call": v["n"] / calls}
                        for k, v in glue.items()), key=lambda r: -r["us_per_call"])
    names: dict = {}
    for e in dev:
        if e.get("cat") == "kernel":
            names[e["name"][:90]] = names.get(e["name"][:90], 0) + e["dur"] / calls
    top = sorted(names.items(), key=lambda kv: -kv[1])[:25]
    return {"kernel_sum_us_per_call": round(kernel_sum / calls, 1),
            "device_events_per_call": len(dev) / calls,
            "span_us": spans, "idle_us_per_call": round(idle / max(1, len(spans)), 1),
            "gap_total_us_per_call": round(total_gap / max(1, len(spans)), 1), "gaps_over_threshold": len(gaps),
            "gaps_top": big[:40], "glue": glue_rows[:40],
            "top_kernels_us": [(k, round(v, 1)) for k, v in top]}


# ---- (d) wall, host, graph -------------------------------------------------------------------
def host_ms(step, reps: int = 5) -> float:
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        ts.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return round(statistics.median(ts), 3)


def graph_ms(step) -> dict:
    """The prefill replayed from a CUDA graph: its kernels with no launch gaps (an upper bound of what
    host work costs). Capture fails on a host sync: the error names it."""
    try:
        return {"graph_ms": round(gm.graph_replay_ms(step, reps=10), 3)}
    except Exception as e:
        return {"graph_error": repr(e)[:400]}


def run_variant(name: str, step, out_dir: str, reps: int, gap_us: float, first: bool, quick: bool = False) -> dict:
    res = RES.setdefault("variants", {}).setdefault(name, {"switches": {k: str(v) for k, v in VARIANTS[name].items()}})
    old = apply_variant(name)
    try:
        for _ in range(3):  # compiles / autotuning out of the way
            step()
        torch.cuda.synchronize()
        if first:
            try:
                res["syncs"] = find_syncs(step)
            except Exception as e:
                res["syncs_error"] = repr(e)[:300]
            print(f"[{name}] {len(res.get('syncs', []))} sync warnings", flush=True)
        res["wall_ms"] = round(gm.timed(step, reps=reps, warmup=1), 3)
        res["wall_ms_again"] = round(gm.timed(step, reps=reps, warmup=0), 3)
        res["host_ms"] = host_ms(step)
        print(f"[{name}] wall {res['wall_ms']} / {res['wall_ms_again']} ms, host {res['host_ms']} ms", flush=True)
        gm.save()
        if quick:  # wall, host and graph replay only, plus the profiler's kernel sum
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            ks: dict = {}
            for ev in prof.key_averages():
                t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                if t:  # (names cut to 90 characters: kernels sharing a prefix are summed)
                    ks[ev.key[:90]] = round(ks.get(ev.key[:90], 0.0) + t / 3, 1)
            res["kernel_sum_us"] = round(sum(ks.values()), 1)
            res["top_kernels_us"] = sorted(ks.items(), key=lambda kv: -kv[1])[:30]
            res.update(graph_ms(step))
            print(f"[{name}] kernels {res['kernel_sum_us']} us, graph {res.get('graph_ms', res.get('graph_error'))}",
                  flush=True)
            return res
        path = os.path.join(out_dir, f"trace_{name}.json")
        res["profile"] = analyse(profile_trace(step, path, with_stack=True), 3, gap_us)
        p = res["profile"]
        print(f"[{name}] kernels {p['kernel_sum_us_per_call']} us/call, idle {p['idle_us_per_call']} us/call, "
              f"gaps {p['gap_total_us_per_call']} us/call "
              f"({p['gaps_over_threshold']} > {gap_us} us over 3 calls)", flush=True)
        nostack = analyse(profile_trace(step, path + ".nostack", with_stack=False), 3, gap_us)
        os.remove(path + ".nostack")
        res["profile_nostack"] = {k: nostack[k] for k in ("kernel_sum_us_per_call", "idle_us_per_call",
                                                          "gap_total_us_per_call", "gaps_over_threshold")}
        res["profile_nostack"]["gaps_top"] = nostack["gaps_top"][:15]
        res.update(graph_ms(step))
        print(f"[{name}] graph {res.get('graph_ms', res.get('graph_error'))}", flush=True)
    except Exception:
        res["error"] = traceback.format_exc()[-2500:]
        print(res["error"], flush=True)
    finally:
        restore(old)
        gm.save()
    return res


def conv_tiles(res: dict) -> None:
    """The DeltaNet varlen conv alone at 8K (80B layer: 8192 channels, q / k norm in the epilogue,
    state pool): the grouped projection read in place (each tile at its map entry), per tile, and
    the contiguous input as the copies path hands it."""
    import triton
    from triton.testing import do_bench

    from qwen3next.kernels.triton import conv1d

    Hk, dk, rdv, K = 16, 128, 256, 4
    W = 2 * dk + 2 * rdv
    base = torch.arange(Hk)[:, None] * W
    cols = torch.cat([(base + torch.arange(dk)).flatten(), (base + dk + torch.arange(dk)).flatten(),
                      (base + 2 * dk + torch.arange(rdv)).flatten()]).cuda()
    C = cols.numel()
    p = torch.randn(T, Hk * W, device="cuda", dtype=torch.bfloat16)
    m = p[:, cols].contiguous()
    w = torch.randn(C, K, device="cuda", dtype=torch.bfloat16)
    pool = torch.randn(2, C, K - 1, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, T], device="cuda")
    slots, init = torch.tensor([0], device="cuda"), torch.tensor([True], device="cuda")
    y = torch.empty(T, C, device="cuda", dtype=torch.bfloat16)
    assert conv1d._map_run(cols) == conv1d.MAP_BC

    def launch(x, SX, xmap, mapped, bt, bc, warps, state=True):
        grid = (triton.cdiv(T, bt), triton.cdiv(C, bc))
        conv1d._conv_varlen_body[grid](x, w, y, cu, 1, 0, pool, slots, init, xmap, T, C, 4096, SX, dk ** -0.5,
                                       K=K, HAS_STATE=state, QK_HEADS=2 * Hk, DK=dk, MAPPED=mapped, FIXUP=False,
                                       BT=bt, BC=bc, num_warps=warps)

    rows = {}
    # (tile, mapped); session 5 measured 32 x 128 / 4 warps best: 175 us mapped, 164-169 contiguous; 16 x 128:
    # 212-240 (4 warps), 172 (2 warps); 64 x 128 / 8: 223-232; 32 x 128 / 8: 294; 64 or 128 rows on 4 warps,
    # 32 x 128 on 2 warps and 32 x 256 / 4: ~3 ms (spills)
    cases = [((32, 128, 4), True), ((32, 128, 4), False), ((16, 128, 2), True), ((64, 128, 8), True)]
    for (bt, bc, warps), mapped in cases:
        x, SX, xmap = (p, p.stride(0), cols) if mapped else (m, C, m)
        name = f"{'map' if mapped else 'contig'} BT{bt} BC{bc} w{warps}"
        try:
            ms = do_bench(lambda: launch(x, SX, xmap, mapped, bt, bc, warps), warmup=10, rep=40,
                          return_mode="median")
            rows[name] = round(ms * 1e3, 1)
        except Exception as e:
            rows[name] = repr(e)[:120]
    # the split form's main launch (no state path): tiles again
    for bt, bc, warps in [(32, 128, 4), (64, 128, 4), (64, 128, 8), (16, 128, 4), (128, 128, 8)]:
        name = f"map no-state BT{bt} BC{bc} w{warps}"
        try:
            ms = do_bench(lambda: launch(p, p.stride(0), cols, True, bt, bc, warps, False), warmup=10, rep=40,
                          return_mode="median")
            rows[name] = round(ms * 1e3, 1)
        except Exception as e:
            rows[name] = repr(e)[:120]
    # the whole call as the layer makes it (conv + state update), state path in one launch or split
    default = conv1d.SPLIT_STATE
    for split in (False, True):
        conv1d.SPLIT_STATE = split
        ms = do_bench(lambda: conv1d.causal_conv1d_varlen(p, w, cu, pool, slots, init, x_cols=cols,
                                                          qk_heads=(Hk, dk)), warmup=10, rep=40, return_mode="median")
        rows[f"layer call, state {'split' if split else 'in one launch'}"] = round(ms * 1e3, 1)
    conv1d.SPLIT_STATE = default
    # the streaming kernel (conv1d.STREAM) per config, the same layer call; its output vs the default's
    want = conv1d.causal_conv1d_varlen(p, w, cu, pool.clone(), slots, init, x_cols=cols, qk_heads=(Hk, dk))
    stream, cfg = conv1d.STREAM, conv1d.STREAM_CFG
    try:
        conv1d.STREAM = True
        for c in conv1d.STREAM_CONFIGS:
            conv1d.STREAM_CFG = c
            name = "layer call, stream R{} L{} w{} pf{}".format(*c)
            try:
                ms = do_bench(lambda: conv1d.causal_conv1d_varlen(p, w, cu, pool, slots, init, x_cols=cols,
                                                                  qk_heads=(Hk, dk)), warmup=10, rep=40,
                              return_mode="median")
                got = conv1d.causal_conv1d_varlen(p, w, cu, pool.clone(), slots, init, x_cols=cols, qk_heads=(Hk, dk))
                rows[name] = round(ms * 1e3, 1)
                rows[name + " max|diff| vs default"] = float((got.float() - want.float()).abs().max())
            except Exception as e:
                rows[name] = repr(e)[:120]
    finally:
        conv1d.STREAM, conv1d.STREAM_CFG = stream, cfg
    res["conv_8k_us"] = rows
    res["conv_floor_us"] = round(2 * T * C * 2 / 4.25e12 * 1e6, 1)
    print("conv 8K (us):", rows, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=".")
    ap.add_argument("--variants", default="base,new")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--gap-us", type=float, default=20.0)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--quick", action="store_true", help="wall, host, graph replay and kernel sums only")
    ap.add_argument("--no-conv", action="store_true", help="skip the conv tile sweep")
    ap.add_argument("--stream-cfg", default=None, help="R,L,warps,PF: conv1d.STREAM_CFG for the 'stream' variant")
    a = ap.parse_args()
    if a.stream_cfg:
        from qwen3next.kernels.triton import conv1d

        conv1d.STREAM_CFG = tuple(int(v) for v in a.stream_cfg.split(","))
    os.makedirs(a.out_dir, exist_ok=True)
    gm.R.path = os.path.join(a.out_dir, "prefill_profile.json")
    gm.R.data = gm.RES = RES  # gm.save() and gm's sections write this run's results
    import triton

    RES["env"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "commit": a.commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    t0 = time.time()
    model = gm.build_slice()
    step = make_step(model)
    RES["build_s"] = round(time.time() - t0, 1)
    if not a.no_conv:
        try:
            conv_tiles(RES.setdefault("conv", {}))
        except Exception:
            RES["conv"]["error"] = traceback.format_exc()[-1500:]
    gm.save()
    names = a.variants.split(",")
    for i, name in enumerate(names):
        run_variant(name, step, a.out_dir, a.reps, a.gap_us, first=(i == 0) and not a.quick, quick=a.quick)
    # the first variant timed again last: drift between the variants' turns
    if len(names) > 1:
        old = apply_variant(names[0])
        RES["variants"][names[0]]["wall_ms_last"] = round(gm.timed(step, reps=a.reps, warmup=1), 3)
        restore(old)
    gm.save()
    print(json.dumps({n: {k: v for k, v in r.items() if k in ("wall_ms", "wall_ms_again", "wall_ms_last", "host_ms",
                                                                "graph_ms", "graph_error")}
                      | {"kernels_us": r.get("profile", {}).get("kernel_sum_us_per_call", r.get("kernel_sum_us")),
                         "idle_us": r.get("profile", {}).get("idle_us_per_call"),
                         "idle_us_nostack": r.get("profile_nostack", {}).get("idle_us_per_call")}
                      for n, r in RES.get("variants", {}).items()}, indent=1))


if __name__ == "__main__":
    main()
