"""Prefix caching on CPU: time to first token of chat requests sharing a long system prompt, with
and without `enable_prefix_caching`, and what a multi-turn chat reuses under the model's template.

    .venv/bin/python benchmarks/bench_prefix_cache_cpu.py [--model DIR] [--system-tokens 2000]
        [--questions 5] [--state-block 256] [--threads 1]

Each engine first answers one warm-up request (kernels built, and with the cache on: the system
prompt's blocks and state snapshots stored); then each question is sent alone and timed from
add_request to the step that returns its first token (median wall time, and this process's CPU
time, which other jobs on a shared machine disturb far less). The multi-turn part runs three greedy turns
with a system prompt of its own (history = the template's rendering of earlier turns) and prints per turn the prompt length, the
tokens it shares with the previous turn's prompt + answer, and the tokens the cache reused.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qwen3next.engine import EngineArgs, LLMEngine  # noqa: E402
from qwen3next.sampling_params import SamplingParams  # noqa: E402
from qwen3next.tokenizer import Tokenizer  # noqa: E402

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "qwen3next", "demo_model")
PARAGRAPH = ("You are a careful assistant for a travel agency. Answer in short sentences, name the "
             "city and the country, give prices in euros, and never invent opening hours. ")
QUESTIONS = ["What is the capital of France?", "Which city has the Colosseum?",
             "Where is the Sagrada Familia?", "What is a good day trip from Vienna?",
             "Which museum in Amsterdam shows Van Gogh?", "Where can I see fjords?",
             "What is the oldest university in Europe?", "Which city is famous for canals?"]


def engine(model: str, on: bool, state_block: int) -> LLMEngine:
    return LLMEngine.from_args(EngineArgs(model=model, device="cpu", dtype="float32", max_model_len=4096,
                                          enable_prefix_caching=on, prefix_caching_state_block=state_block))


def run(eng: LLMEngine, rid: str, ids: list[int], max_tokens: int):
    """-> ((wall, CPU) seconds to the first token, all generated ids, num_cached_tokens)."""
    t0 = time.perf_counter(), time.process_time()
    eng.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=max_tokens))
    ttft, toks, cached = None, [], 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            if ttft is None and o.outputs and o.outputs[0].token_ids:
                ttft = time.perf_counter() - t0[0], time.process_time() - t0[1]
            toks += o.outputs[0].token_ids
            cached = o.num_cached_tokens
    return ttft, toks, cached


def common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEMO)
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--state-block", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok = Tokenizer.from_dir(a.model)
    per = len(tok.encode(PARAGRAPH))
    system = PARAGRAPH * max(1, a.system_tokens // per)

    def prompt(q: str, sys_text: str = system) -> list[int]:
        msgs = [{"role": "system", "content": sys_text}, {"role": "user", "content": q}]
        return tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))

    qs = [QUESTIONS[(i + 1) % len(QUESTIONS)] for i in range(a.questions)]
    print(f"system prompt {len(prompt(''))} tokens; {a.questions} questions; state_block {a.state_block}; "
          f"torch threads {a.threads}")
    for on in (False, True):
        eng = engine(a.model, on, a.state_block)
        run(eng, "warm", prompt(QUESTIONS[0]), 1)  # (one-time costs)
        # a miss: with the cache on its prefill stops at each state_block boundary for a snapshot
        cold = [run(eng, f"cold{i}", prompt(QUESTIONS[0], f"Note {i}. " + system), 1)[0] for i in range(3)]
        times, cached = [], []
        for i, q in enumerate(qs):
            ttft, _, c = run(eng, f"q{i}", prompt(q), 1)
            times.append(ttft)
            cached.append(c)
        wall = statistics.median(t[0] for t in times) * 1e3
        cpu = statistics.median(t[1] for t in times) * 1e3
        print(f"prefix caching {'on ' if on else 'off'}: TTFT median {wall:.1f} ms wall, {cpu:.1f} ms CPU "
              f"time; cached tokens {cached}; a miss: {statistics.median(t[1] for t in cold) * 1e3:.1f} ms CPU")
        if on:
            multi_turn(eng, tok, "You are a friendly chat partner who likes maps. " * 60)


def multi_turn(eng: LLMEngine, tok: Tokenizer, system: str) -> None:
    msgs = [{"role": "system", "content": system}]
    prev: list[int] = []
    for turn, q in enumerate(QUESTIONS[:3]):
        msgs.append({"role": "user", "content": q})
        ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))
        _, out, cached = run(eng, f"turn{turn}", ids, 256)
        think = "</think>" in tok.decode(out, skip_special_tokens=False)
        print(f"turn {turn}: prompt {len(ids)} tokens, shares {common(prev, ids)} with the previous "
              f"prompt + answer, cache reused {cached}; its answer: {len(out)} tokens"
              f"{', reasoning closed' if think else ', no </think>'}")
        prev = ids + out
        msgs.append({"role": "assistant", "content": tok.decode(out, skip_special_tokens=False)
                     .replace("<|im_end|>", "")})


if __name__ == "__main__":
    main()
