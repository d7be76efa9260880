"""Speculative-verify forward vs decode forward on CPU: the cost of one trunk forward that brings
k+1 tokens per sequence and saves the DeltaNet states after each (per_token_state_slots), against
a plain one-token decode forward, with the fused C++ kernels (kernels/cpu_ext) on and off.

    .venv/bin/python benchmarks/bench_verify_cpu.py [--model DIR] [--batch 1] [--k 3] [--context 100]
        [--threads 1] [--iters 200]

Default model: the shipped demo model (qwen3next/demo_model). Prints the median time of
forward + compute_logits (logits of every new token, as verify needs) for each case.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qwen3next.forward_batch import ForwardBatch, ModelCache  # noqa: E402
from qwen3next.loader import load_model  # noqa: E402


def make_cache(model, batch: int, tokens: int, block_size: int = 16) -> ModelCache:
    """Blocks for `batch` sequences of up to `tokens` tokens; state slots: one per sequence, then
    one per (sequence, position) for the per-token states."""
    spec = model.state_spec()
    per_seq = -(-tokens // block_size)
    slots = batch * (1 + 16)
    c = ModelCache(block_size=block_size)
    c.kv = {i: torch.zeros(batch * per_seq, 2, block_size, *s) for i, s in spec.kv_layers.items()}
    c.conv = {i: torch.zeros(slots, *s) for i, s in spec.conv_layers.items()}
    c.recurrent = {i: torch.zeros(slots, *s) for i, s in spec.recurrent_layers.items()}
    return c


def step_batch(cache: ModelCache, batch: int, n: int, context: int, per_token: bool):
    """-> (positions, ForwardBatch) for `batch` sequences each bringing n tokens after `context`."""
    bs = cache.block_size
    per_seq = next(iter(cache.kv.values())).shape[0] // batch
    tables = torch.arange(batch * per_seq).view(batch, per_seq)
    pos = torch.arange(context, context + n).repeat(batch)
    row = torch.arange(batch).repeat_interleave(n)
    pts = batch + torch.arange(batch * n) if per_token else None
    fb = ForwardBatch(cu_seqlens=torch.arange(0, batch * n + 1, n), seq_lens=[n] * batch,
                      context_lens=[context] * batch, cache=cache, block_tables=tables,
                      slot_mapping=tables[row, pos // bs] * bs + pos % bs, state_slots=torch.arange(batch),
                      per_token_state_slots=pts)
    return pos, fb


def time_forward(model, cache, batch, n, context, per_token, iters) -> float:
    """Median ms of forward + compute_logits over `iters` runs (after 5 warm-up runs)."""
    ids = torch.randint(0, model.config.vocab_size, (batch * n,))
    times = []
    with torch.inference_mode():
        for i in range(iters + 5):
            pos, fb = step_batch(cache, batch, n, context, per_token)
            t = time.perf_counter()
            model.compute_logits(model(ids, pos, fb))
            if i >= 5:
                times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "..", "qwen3next", "demo_model"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--k", type=int, default=3, help="draft tokens: verify brings k+1 tokens per sequence")
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=200)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, _ = load_model(a.model, dtype=torch.float32, device="cpu", with_mtp=False, progress=False)
    cache = make_cache(model, a.batch, a.context + a.k + 1)
    print(f"model {os.path.basename(os.path.normpath(a.model))}, batch {a.batch}, k {a.k}, context {a.context}, "
          f"torch threads {torch.get_num_threads()}")
    for ext in ("0", "1"):
        os.environ["QWEN3NEXT_CPU_EXT"] = ext
        dec = time_forward(model, cache, a.batch, 1, a.context, False, a.iters)
        ver = time_forward(model, cache, a.batch, a.k + 1, a.context, True, a.iters)
        print(f"C++ kernels {'on ' if ext == '1' else 'off'}: decode forward {dec:.2f} ms, verify forward "
              f"({a.k + 1} tokens/seq, per-token states) {ver:.2f} ms, ratio {ver / dec:.2f}")


if __name__ == "__main__":
    main()
