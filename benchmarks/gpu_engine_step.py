"""Where an engine decode step's time goes on the GPU (the 80B-dimension 8-layer slice of
gpu_model.py): host time per phase of LLMEngine.step (cProfile) against the CUDA-graph replay's
device time, at batch 256.

    python benchmarks/gpu_engine_step.py --out gpu_engine_step.json [--batch 256]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import torch

from benchmarks.gpu_model import DIMS, build_models
from qwen3next.engine import EngineArgs, LLMEngine
from qwen3next.engine.cuda_graph import CudaGraphRunner
from qwen3next.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_engine_step.json")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=48)
    a = ap.parse_args()
    ours, _ = build_models(with_hf=False)
    B = a.batch
    eng = LLMEngine(ours, EngineArgs(device="cuda", max_num_seqs=B, max_num_batched_tokens=8192, max_model_len=512,
                                     enforce_eager=True, gpu_memory_utilization=0.9), eos_token_ids=[])
    graphs = CudaGraphRunner(ours, eng.cache.cache, eng.cache.max_blocks_per_seq, B, batch_sizes=[B])
    graphs.capture()
    eng.runner.graphs = graphs
    replay_ms: list[float] = []
    run = graphs.run

    def timed_run(*args):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = run(*args)
        e.record()
        e.synchronize()
        replay_ms.append(s.elapsed_time(e))
        return out

    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=a.steps + 32, ignore_eos=True)
    for i in range(B):
        eng.add_request(str(i), torch.randint(0, DIMS["vocab_size"], (64,), generator=g).tolist(), params)
    while len(eng.scheduler.running) < B or any(s.num_computed_tokens < 64 for s in eng.scheduler.running):
        eng.step()  # prefill
    for _ in range(4):
        eng.step()
    torch.cuda.synchronize()
    res: dict = {"batch": B}
    # 1) plain wall time per step
    walls = []
    for _ in range(a.steps // 2):
        t0 = time.perf_counter()
        eng.step()
        walls.append((time.perf_counter() - t0) * 1e3)
    res["step_wall_ms"] = round(statistics.median(walls), 3)
    # 2) replay device time alone (events around graphs.run, host waits)
    graphs.run = timed_run
    for _ in range(8):
        eng.step()
    graphs.run = run
    res["replay_ms_synced"] = round(statistics.median(replay_ms), 3)
    # 3) cProfile of steps
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(a.steps // 4):
        eng.step()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumtime").print_stats(30)
    res["cprofile"] = s.getvalue()[-6000:]
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(20)
    res["cprofile_tottime"] = s.getvalue()[-4000:]
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("cprofile")}), flush=True)
    print(res["cprofile_tottime"], flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
