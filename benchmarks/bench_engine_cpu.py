"""Engine vs transformers on CPU: the same greedy requests through LLMEngine and through
transformers' batched (left-padded) generate, on one tiny checkpoint, in one run.

    .venv/bin/python benchmarks/bench_engine_cpu.py [--model DIR] [--requests 64] [--max-tokens 64]
        [--min-tokens 64] [--threads 1]

Without --model a tiny random checkpoint (tests/helpers/checkpoints.py) is built in a temp dir.
Each request asks for a number of new tokens drawn from [--min-tokens, --max-tokens] (equal by
default); transformers generates each batch up to its longest request and is credited only with
the tokens the requests asked for. Prints generated tokens per second of each (by wall time and by
this process's CPU time, which a machine shared with other jobs disturbs far less), the ratios, and
how many outputs agree token for token.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qwen3next.engine import EngineArgs, LLMEngine  # noqa: E402
from qwen3next.sampling_params import SamplingParams  # noqa: E402


def make_prompts(n: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lens]


def _clock() -> tuple[float, float]:
    """(wall, CPU time of this process) in seconds."""
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    t1 = _clock()
    return t1[0] - t0[0], t1[1] - t0[1]


def run_engine(model_dir: str, prompts, new_tokens: list[int], max_num_seqs: int):
    engine = LLMEngine.from_args(EngineArgs(model=model_dir, dtype="float32", device="cpu",
                                            max_num_seqs=max_num_seqs, max_num_batched_tokens=2048))
    engine.add_request("warmup", prompts[0][:8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    out: dict[str, list[int]] = {}
    t = _clock()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=new_tokens[i], ignore_eos=True))
        out[str(i)] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] += o.outputs[0].token_ids
    return _since(t), [out[str(i)] for i in range(len(prompts))]


@torch.inference_mode()
def run_transformers(model_dir: str, prompts, new_tokens: list[int], batch: int):
    from transformers import Qwen3NextForCausalLM

    model = Qwen3NextForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None

    def generate(chunk, n):
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
        return [row[width:].tolist() for row in gen]

    generate([prompts[0][:8]], 4)  # warm-up
    t = _clock()
    out = []
    for i in range(0, len(prompts), batch):
        n = new_tokens[i:i + batch]
        out += [row[:k] for row, k in zip(generate(prompts[i:i + batch], max(n)), n)]
    return _since(t), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint dir (default: build a tiny random one)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--min-tokens", type=int, default=None, help="default: --max-tokens")
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=64, help="transformers' batch size")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = None
    model_dir = a.model
    if model_dir is None:
        from tests.helpers.checkpoints import make_tiny_checkpoint

        tmp = tempfile.TemporaryDirectory()
        model_dir = make_tiny_checkpoint(tmp.name, with_tokenizer=False, with_mtp=False)
    from qwen3next.config import ModelConfig

    cfg = ModelConfig.from_dir(model_dir)
    prompts = make_prompts(a.requests, cfg.vocab_size, a.min_prompt, a.max_prompt)
    lo = a.max_tokens if a.min_tokens is None else a.min_tokens
    g = torch.Generator().manual_seed(1)
    new_tokens = torch.randint(lo, a.max_tokens + 1, (a.requests,), generator=g).tolist()
    n_gen = sum(new_tokens)
    t_eng, out_eng = run_engine(model_dir, prompts, new_tokens, a.max_num_seqs)
    t_hf, out_hf = run_transformers(model_dir, prompts, new_tokens, a.hf_batch)
    same = sum(x == y for x, y in zip(out_eng, out_hf))
    print(f"requests {a.requests}, prompt {a.min_prompt}-{a.max_prompt} tokens, {lo}-{a.max_tokens} new tokens each "
          f"({n_gen} in all), torch threads {torch.get_num_threads()}")
    for name, (wall, cpu), extra in (("engine", t_eng, ""), ("transformers", t_hf, f"  (batch {a.hf_batch})")):
        print(f"{name + ':':14s}{wall:7.2f} s wall {n_gen / wall:8.1f} tok/s | "
              f"{cpu:7.2f} s CPU {n_gen / cpu:8.1f} tok/s{extra}")
    print(f"ratio engine/transformers: {t_hf[0] / t_eng[0]:.2f}x wall, {t_hf[1] / t_eng[1]:.2f}x CPU time; "
          f"identical greedy outputs: {same}/{a.requests}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
