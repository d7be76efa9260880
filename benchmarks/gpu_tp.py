"""Tensor parallelism on several GPUs through NCCL, in one device call.

    python benchmarks/gpu_tp.py --out DIR [--tp 2] [--commit SHA] [--sections correct,slice,kill]

Each section runs in its own subprocess under a time limit, so a hang is recorded, not waited out;
results go to DIR/gpu_tp.json (written after every section). NVLink multicast stays off
(NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1, inherited by every
rank). Sections:
  correct  a tiny float32 checkpoint (the tests' builder): greedy tokens at TP=N (decode CUDA
           graphs on; eager if they fail) equal TP=1's, an n=2 fork included; the TP=1 run is
           section correct1's when it ran first (it fits beside slice1: "slice1+correct1")
  slice    the 8-layer 80B-dims slice (gpu_model.DIMS), load_format="dummy", bf16, at TP=1 and
           TP=N: engine start-up, weights and GPU memory per rank, TTFT of one 8K prompt through
           LLM.generate, decode engine-step ms at batch 1 and 64 (1K-token prompts) by graph and
           eagerly (runner.graphs set aside)
  kill     TP=N tiny model: one worker killed mid-generate -> rank 0 raises an error naming the
           rank, and every process is gone, within time limits
  fullN    as slice, on the whole 80B architecture (48 layers, ~159 GB of bf16 weights: x4 or x8),
           its cache sized by gpu_memory_utilization 0.9 (not in the default sections)
"""

from __future__ import annotations

import os

# before torch / NCCL load, inherited by the spawned ranks: multicast can take the host's GPUs down
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LIMITS = {"correct": 90, "correct1": 60, "slice1": 75, "sliceN": 90, "kill": 45, "fullN": 300}  # seconds per subprocess, at most
TINY_ENGINE = dict(dtype="float32", device="cuda", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64,
                   kv_cache_memory_bytes=256 << 20, skip_tokenizer_init=True)


_PART: list = []  # (res, path) of this child: saved after each figure, so a time-out keeps them


def _save() -> None:
    if _PART:
        with open(_PART[1], "w") as f:
            json.dump(_PART[0], f)


def _free(llm) -> None:
    llm.llm_engine.shutdown()
    del llm
    gc.collect()
    import torch

    torch.cuda.empty_cache()


def _tiny_ckpt(tmp: str) -> str:
    from tests.helpers.checkpoints import make_tiny_checkpoint

    path = os.path.join(tmp, "tiny")
    if not os.path.isdir(path):  # built aside, then renamed: sections side by side may both build it
        # 4 key heads (of 8 value heads): splits over up to 4 ranks
        mine = make_tiny_checkpoint(f"{path}.{os.getpid()}", with_tokenizer=False, with_mtp=False,
                                    linear_num_key_heads=4, linear_num_value_heads=8)
        try:
            os.rename(mine, path)
        except OSError:  # the other one's is there (same seed, same weights)
            pass
    return path


def _count_graph_runs(engine, timed: list | None = None) -> list:
    """[replays so far], counted by wrapping the runner's graph run (empty list: no graphs); with
    `timed`, each run's ms (TP: the workers' message + the replay, synchronised) is appended."""
    import torch

    g = engine.runner.graphs
    if g is None:
        return []
    n, run = [0], g.run

    def counted(*a):
        n[0] += 1
        if timed is None:
            return run(*a)
        t0 = time.perf_counter()
        out = run(*a)
        torch.cuda.synchronize()
        timed.append((time.perf_counter() - t0) * 1e3)
        return out

    g.run = counted
    return n


# ---- sections (each in its own process) ---------------------------------------------------------
def correct(res: dict, tp: int, tmp: str) -> None:
    import torch

    from qwen3next import LLM, SamplingParams

    ckpt = _tiny_ckpt(tmp)
    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(0, 500, (n,), generator=g).tolist()} for n in (5, 40, 13, 70)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    fork = SamplingParams(n=2, temperature=0, max_tokens=24, ignore_eos=True)

    def tokens(size: int, eager: bool) -> dict:
        t0 = time.time()
        llm = LLM(model=ckpt, tensor_parallel_size=size, enforce_eager=eager, **TINY_ENGINE)
        r = {"init_s": round(time.time() - t0, 1)}
        n = _count_graph_runs(llm.llm_engine)
        r["tokens"] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        r["fork"] = [c.token_ids for c in llm.generate(prompts[1], fork)[0].outputs]
        r["graph_replays"] = n[0] if n else None
        _free(llm)
        return r

    done = os.path.join(tmp, "correct1.json")  # the TP=1 run, when section correct1 ran it
    one = res["tp1"] = json.load(open(done))["tp1"] if os.path.isfile(done) else tokens(1, eager=False)
    _save()
    if tp == 1:
        return
    for name, eager in (("graphs", False), ("eager", True)):  # eager only when the graphs failed
        try:
            r = res[f"tp{tp}_{name}"] = tokens(tp, eager)
            r["equal_tp1"] = r["tokens"] == one["tokens"]
            r["fork_equal_tp1"] = r["fork"] == [one["tokens"][1]] * 2
            print(f"correct TP={tp} {name}: equal {r['equal_tp1']}, fork {r['fork_equal_tp1']}, "
                  f"graph replays {r['graph_replays']}", flush=True)
            _save()
            break
        except Exception:
            res[f"tp{tp}_{name}"] = {"error": traceback.format_exc()[-2500:]}
            print(res[f"tp{tp}_{name}"]["error"], flush=True)


def _slice_dir(tmp: str, layers: int = 8) -> str:
    """config.json of gpu_model's 80B dims on `layers` layers (48: the whole 80B architecture)."""
    from benchmarks.gpu_model import DIMS, ROPE

    path = os.path.join(tmp, f"slice{layers}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**DIMS, "num_hidden_layers": layers, "layer_types": DIMS["layer_types"] * (layers // 8),
                   "rope_parameters": ROPE, "model_type": "qwen3_next", "dtype": "bfloat16",
                   "architectures": ["Qwen3NextForCausalLM"]}, f)
    return path


def _gpu_mem_mib() -> list:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return [int(line.split(",")[1]) for line in out.strip().splitlines()]


def _decode_steps(engine, B: int, prompt_len: int, steps: int, vocab: int, tag: str) -> dict:
    """B requests of prompt_len random tokens; after every prefill is done, the median wall ms of
    `steps` engine steps (host work, sampling and the TP messages included)."""
    import torch

    from qwen3next.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(B)
    # (the first prompts decode while the last prefill: enough tokens left for every timed step)
    params = SamplingParams(temperature=0, max_tokens=steps + 24, ignore_eos=True)
    ids = [f"{tag}{B}-{i}" for i in range(B)]
    for rid in ids:
        engine.add_request(rid, torch.randint(0, vocab, (prompt_len,), generator=g).tolist(), params)
    got: dict = {}
    while len(got) < B or min(got.values()) < 1:  # prefills (and mixed steps) first
        for out in engine.step():
            got[out.request_id] = len(out.outputs[0].token_ids)
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        ts.append((time.perf_counter() - t0) * 1e3)
    for rid in ids:
        engine.abort_request(rid)
    engine.step()
    return {"step_ms": round(statistics.median(ts), 3), "min_ms": round(min(ts), 3), "steps": steps}


def slice_run(res: dict, tp: int, tmp: str, ttft: bool = True, layers: int = 8) -> None:
    """layers=48 (section fullN): the whole 80B architecture, its cache sized by
    gpu_memory_utilization=0.9 (the plan's blocks and slots are the memory left for cache)."""
    import torch

    from benchmarks.gpu_model import DIMS
    from qwen3next import LLM, SamplingParams

    path = _slice_dir(tmp, layers)
    before = _gpu_mem_mib()
    t0 = time.time()
    kw = dict(tensor_parallel_size=tp, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", device="cuda",
              max_num_seqs=64, max_num_batched_tokens=8192, max_model_len=8192 + 64,
              kv_cache_memory_bytes=8 << 30 if layers == 8 else None)
    llm = None
    try:
        llm = LLM(model=path, **kw)
    except Exception:  # (the CUDA graphs under TP, say): the eager figures still come back
        res["graphs_error"] = traceback.format_exc()[-2500:]
        print(res["graphs_error"], flush=True)
    if llm is None:  # (out of the except block: its traceback no longer holds the failed model)
        gc.collect()
        torch.cuda.empty_cache()
        llm = LLM(model=path, enforce_eager=True, **kw)
    res["init_s"] = round(time.time() - t0, 1)
    eng = llm.llm_engine
    inner = getattr(eng.model, "inner", eng.model)
    res["weights_GiB_rank0"] = round(sum(p.numel() * p.element_size() for p in inner.parameters()) / 2**30, 2)
    res["gpu_mem_used_MiB"] = [a - b for a, b in zip(_gpu_mem_mib(), before)]
    res["rank0_max_allocated_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    plan = eng.cache.plan
    res["cache_blocks"], res["state_slots"] = plan.num_blocks, plan.num_slots
    # memory left for cache on rank 0: what the plan took + what is still free
    res["cache_GiB_rank0"] = round((plan.num_blocks * plan.bytes_per_block + plan.num_slots * plan.bytes_per_slot)
                                   / 2**30, 2)
    res["free_after_init_GiB_rank0"] = round(torch.cuda.mem_get_info()[0] / 2**30, 2)
    res["graphs"] = eng.runner.graphs is not None
    print(f"slice TP={tp}: init {res['init_s']} s, weights/rank {res['weights_GiB_rank0']} GiB, "
          f"GPU mem {res['gpu_mem_used_MiB']} MiB, graphs {res['graphs']}", flush=True)
    _save()
    V = DIMS["vocab_size"]
    if ttft:
        g = torch.Generator().manual_seed(0)
        prompt = {"prompt_token_ids": torch.randint(0, V, (8192,), generator=g).tolist()}
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        llm.generate(prompt, one)  # compiles the 8K prefill shapes
        ts = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            llm.generate(prompt, one)
            ts.append((time.perf_counter() - t0) * 1e3)
        res["ttft_8k_ms"] = round(statistics.median(ts), 2)
        print(f"slice TP={tp}: TTFT 8K {res['ttft_8k_ms']} ms ({[round(t, 1) for t in ts]})", flush=True)
        _save()
    run_ms: list = []
    n = _count_graph_runs(eng, run_ms)
    for B in (1, 64):
        del run_ms[:]
        r = res[f"decode_B{B}"] = _decode_steps(eng, B, 1024, 30, V, "g")
        r["graph_replays"] = n[0] if n else None
        if run_ms:  # the last 30: the timed steps' graph runs (forward + logits, no sampling)
            r["graph_run_ms"] = round(statistics.median(run_ms[-30:]), 3)
        if n:
            graphs, eng.runner.graphs = eng.runner.graphs, None
            r["eager"] = _decode_steps(eng, B, 1024, 10, V, "e")
            eng.runner.graphs = graphs
        print(f"slice TP={tp}: decode B={B} step {r['step_ms']} ms, graph run {r.get('graph_run_ms')} ms "
              f"(graph replays {r['graph_replays']}), "
              f"eager {r.get('eager', {}).get('step_ms')} ms", flush=True)
        _save()
    _free(llm)


def kill(res: dict, tp: int, tmp: str) -> None:
    import multiprocessing

    from qwen3next import LLM, SamplingParams

    llm = LLM(model=_tiny_ckpt(tmp), tensor_parallel_size=tp, **{**TINY_ENGINE, "max_model_len": 512})
    workers = list(llm.llm_engine.model.workers)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": list(range(20, 60))}]
    killed = {}

    def killer():
        time.sleep(1.0)
        killed["t"] = time.monotonic()
        workers[0].kill()

    threading.Thread(target=killer, daemon=True).start()
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:  # generates back to back: the kill lands in one of them
            llm.generate(prompts, params)
        res["error"] = "30 s of generates without an error"
    except Exception as e:  # noqa: BLE001 - the point: which error, how fast
        res["raised"] = f"{type(e).__name__}: {e}"[:300]
        res["raise_after_kill_s"] = round(time.monotonic() - killed.get("t", time.monotonic()), 2)
    t0 = time.monotonic()
    llm.llm_engine.shutdown()
    res["shutdown_s"] = round(time.monotonic() - t0, 2)
    res["workers_alive"] = [p.is_alive() for p in workers]
    res["children_alive"] = len(multiprocessing.active_children())
    res["names_rank"] = "rank 1 is gone" in res.get("raised", "")
    print(f"kill: {res}", flush=True)


SECTIONS = {"correct": correct, "correct1": correct, "slice1": slice_run, "sliceN": slice_run, "kill": kill,
            "fullN": functools.partial(slice_run, layers=48)}


def child(name: str, tp: int, tmp: str, out: str, ttft: list) -> None:
    res: dict = {}
    _PART[:] = [res, out]
    t0 = time.time()
    try:
        kw = {"ttft": name in ttft} if name.startswith(("slice", "full")) else {}
        SECTIONS[name](res, 1 if name.endswith("1") else tp, tmp, **kw)
    except Exception:
        res["error"] = traceback.format_exc()[-3000:]
        print(res["error"], flush=True)
    res["wall_s"] = round(time.time() - t0, 1)
    _save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--commit", default=None)
    # correct1 apart from correct: on the H200s a TP=2 start in a process that had run a TP=1 CUDA
    # engine lost its worker before the rendezvous (cause not found; now an error, no longer a hang)
    ap.add_argument("--sections", default="correct1,correct,kill,sliceN,slice1")
    ap.add_argument("--ttft", default="slice1,sliceN", help="the slice sections that time the 8K TTFT")
    ap.add_argument("--budget-s", type=float, default=1e9, help="all sections together (each gets what is left)")
    ap.add_argument("--device", default="cuda", help="cpu: a gloo smoke test of correct / kill")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    TINY_ENGINE["device"] = a.device
    if a.child:
        return child(a.child, a.tp, a.tmp, a.child_out, a.ttft.split(","))
    import torch

    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "gpu_tp.json")
    cuda = a.device == "cuda"
    res = {"env": {"devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                   "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                   "commit": a.commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "tp": a.tp, "autotune": os.environ.get("QWEN3NEXT_AUTOTUNE", "1"),
                   "multicast_env": {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")}}}
    tmp = tempfile.mkdtemp(prefix="gpu_tp")
    end = time.time() + a.budget_s
    for group in a.sections.split(","):  # "a+b": one-GPU sections side by side, on GPU 0, 1, ...
        t0 = time.time()
        names = group.split("+")
        if end - t0 < 15:
            res.update({name: {"skipped": "no budget left"} for name in names})
            continue
        procs = {}
        for i, name in enumerate(names):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--tp", str(a.tp), "--tmp", tmp,
                   "--child-out", os.path.join(tmp, f"{name}.json"), "--device", a.device, "--ttft", a.ttft]
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(i)) if len(names) > 1 else None
            # its own session: on a time-out the whole group (the spawned ranks too) is killed
            procs[name] = subprocess.Popen(cmd, start_new_session=True, env=env)
        for name, p in procs.items():
            try:
                rc = p.wait(timeout=max(1.0, min(t0 + LIMITS[name], end) - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                rc = "timeout"
            part = os.path.join(tmp, f"{name}.json")
            r = json.load(open(part)) if os.path.isfile(part) else {}
            r.update(rc=rc, process_s=round(time.time() - t0, 1))
            res[name] = r
            with open(path, "w") as f:
                json.dump(res, f, indent=1)
            print(f"== {name}: rc {rc} in {r['process_s']} s", flush=True)
    s1, sN = res.get("slice1", {}), res.get("sliceN", {})
    ratios = {}
    for k in ("ttft_8k_ms", "decode_B1", "decode_B64"):
        a1, aN = s1.get(k), sN.get(k)
        if isinstance(a1, dict) and isinstance(aN, dict):
            a1, aN = a1.get("step_ms"), aN.get("step_ms")
        if a1 and aN:
            ratios[f"{k}_tpN_over_tp1"] = round(aN / a1, 3)
    res["ratios"] = ratios
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    brief = {k: {s: v for s, v in r.items() if s not in ("tokens", "fork")} if isinstance(r, dict) else r
             for k, r in res.get("correct", {}).items()}
    print(json.dumps({**res, "correct": brief, "env": None}, indent=None)[:6000])


if __name__ == "__main__":
    main()
