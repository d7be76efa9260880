"""Where an engine step's time goes, on the serving benchmark's checkpoint and load shape.

Runs `LLMEngine` in-process (no HTTP) on N concurrent requests of 64 tokens (ignore_eos, the
checkpoint's generation_config sampling), with wall-clock timers wrapped around the scheduler,
batch building, each layer's parts (norms, DeltaNet mixer, attention mixer, MoE / MLP), the
logits, the sampler and the engine's own bookkeeping; prints ms per step and the share of each,
for prefill-carrying steps and pure decode steps separately. The HTTP side (detokenize, JSON,
SSE) is not here: profile the server with py-spy while bench_serving_vs_vllm.py drives it.

    python benchmarks/profile_serving_step.py --concurrency 32 --dtype float32 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving_load import prompt  # noqa: E402
from serving_setup import build_checkpoint  # noqa: E402


CLOCK = time.perf_counter  # --clock cpu: this thread's CPU time (steadier on a shared machine)


class Timers:
    def __init__(self):
        self.acc: dict[str, float] = collections.defaultdict(float)

    def wrap(self, obj, attr: str, name: str) -> None:
        """Replace obj.attr by a timed call of the original (an instance attribute)."""
        orig = getattr(obj, attr)

        def timed(*a, **k):
            t = CLOCK()
            try:
                return orig(*a, **k)
            finally:
                self.acc[name] += CLOCK() - t

        setattr(obj, attr, timed)

    def take(self) -> dict[str, float]:
        out, self.acc = dict(self.acc), collections.defaultdict(float)
        return out


def instrument(engine, timers: Timers) -> None:
    model = engine.model
    timers.wrap(engine.scheduler, "schedule", "scheduler")
    timers.wrap(engine.runner, "build_batch", "input prep")
    timers.wrap(engine.runner, "execute", "execute")
    timers.wrap(engine.runner, "sampler", "sampler")
    timers.wrap(model, "forward", "model forward")
    timers.wrap(model, "compute_logits", "logits")
    timers.wrap(model.model.embed_tokens, "forward", "embed")
    timers.wrap(model.rotary, "forward", "rotary")
    timers.wrap(model.model.norm, "forward", "norms")
    for layer in model.model.layers:
        timers.wrap(layer.input_layernorm, "forward", "norms")
        timers.wrap(layer.post_attention_layernorm, "forward", "norms")
        if hasattr(layer, "linear_attn"):
            timers.wrap(layer.linear_attn, "forward", "deltanet mixer")
        else:
            timers.wrap(layer.self_attn, "forward", "attention mixer")
        timers.wrap(layer.mlp, "forward", "moe" if layer.is_moe else "mlp")


def run(engine, tok, params, n: int, offset: int, timers: Timers):
    for i in range(n):
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt(offset + i)}],
                                                 add_generation_prompt=True))
        engine.add_request(f"p{offset + i}", ids, params)
    kinds = {"prefill": collections.Counter(), "decode": collections.Counter()}
    steps = collections.Counter()
    tokens = 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        timers.take()
        t = CLOCK()
        sched_tokens = []
        orig = engine.scheduler.schedule

        def spy():
            out = orig()
            sched_tokens.extend(out.num_new_tokens)
            return out

        engine.scheduler.schedule = spy
        outs = engine.step()
        engine.scheduler.schedule = orig
        dt = CLOCK() - t
        kind = "decode" if sched_tokens and max(sched_tokens) == 1 else "prefill"
        acc = timers.take()
        acc["step"] = dt
        kinds[kind].update(acc)
        steps[kind] += 1
        tokens += sum(len(co.token_ids) for o in outs for co in o.outputs)
    return kinds, steps, tokens, time.perf_counter() - t0


def report(kinds, steps, tokens, wall, n) -> None:
    busy = sum(kinds[k]["step"] for k in kinds)
    print(f"\n{n} requests: {tokens} tokens in {wall:.2f}s wall = {tokens / wall:.0f} tok/s; "
          f"{busy:.2f}s in steps by the clock = {tokens / busy:.0f} tok/s "
          f"({steps['prefill']} prefill steps, {steps['decode']} decode steps)")
    parts = ["scheduler", "input prep", "embed", "rotary", "norms", "deltanet mixer", "attention mixer",
             "moe", "mlp", "logits", "sampler"]
    for kind in ("prefill", "decode"):
        acc, k = kinds[kind], steps[kind]
        if not k:
            continue
        step = acc["step"]
        layers = sum(acc.get(p, 0.0) for p in parts[2:9])
        derived = {
            "forward other": acc.get("model forward", 0.0) - layers,
            "execute other": acc.get("execute", 0.0) - acc.get("input prep", 0.0) - acc.get("model forward", 0.0)
            - acc.get("logits", 0.0) - acc.get("sampler", 0.0),
            "engine bookkeeping": step - acc.get("scheduler", 0.0) - acc.get("execute", 0.0),
        }
        print(f"  {kind:8s} {step / k * 1e3:8.2f} ms/step")
        for name in parts + list(derived):
            v = derived.get(name, acc.get(name, 0.0))
            if v > 0:
                print(f"    {name:20s} {v / k * 1e3:8.3f} ms  {100 * v / step:5.1f}%")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt-dir", default="/tmp/qwen3next-bench-serving-ckpt")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: time parts by this thread's CPU time (use with --threads 1 on a busy machine)")
    p.add_argument("--cprofile", action="store_true", help="also print cProfile's top functions")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.thread_time
    from qwen3next.engine.args import EngineArgs
    from qwen3next.engine.llm_engine import LLMEngine
    from qwen3next.sampling_params import SamplingParams
    from qwen3next.tokenizer import get_tokenizer

    ckpt = build_checkpoint(args.ckpt_dir)
    engine = LLMEngine.from_args(EngineArgs(model=ckpt, dtype=args.dtype, device="cpu", max_num_seqs=128,
                                            max_model_len=1024))
    tok = get_tokenizer(ckpt)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True).with_generation_config(
        engine.generation_config)
    timers = Timers()
    run(engine, tok, params, 8, 10_000, timers)  # warm-up
    instrument(engine, timers)
    report(*run(engine, tok, params, args.concurrency, 0, timers), args.concurrency)
    if args.cprofile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        run(engine, tok, params, args.concurrency, 20_000, timers)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
