"""MTP speculative decoding on CPU: tokens/s and mean accepted length with and without MTP, at 1
and 16 concurrent requests, plus the cost of the two ways to roll DeltaNet states back.

    .venv/bin/python benchmarks/bench_mtp_cpu.py [--model DIR] [--ks 0,1,2,3] [--concurrency 1,16]
        [--requests-per-slot 2] [--max-tokens 64] [--threads 1] [--repeat 1] [--oracle] [--rollback]
        [--wall] [--disable-by-batch-size N] [--sampling] [--split]

Tokens/s are per second of this process's CPU time (one torch thread), since on a shared machine
other jobs inflate wall time at random; --wall times by the wall clock instead.

Model: --model, else the shipped demo model (qwen3next/demo_model) when present, else a tiny random
checkpoint (random MTP: acceptance ~0, so it shows only the overhead). Prompts: synthetic chat tasks
(qwen3next/train/data.py) through the chat template when the model has a tokenizer, else random ids.
Greedy; every MTP run's outputs are checked token for token against the k = 0 run. --sampling uses
the demo model's generation defaults instead (temperature 0.6, top_p 0.95, top_k 20, one seed per
request): outputs then differ from the k = 0 run's by design (rejection sampling), so the column
counts only equal lengths.

--oracle adds rows whose drafts are the k = 0 run's own outputs (the MTP forwards still run, only
the draft choice is replaced): acceptance 1, the ceiling a perfect MTP head would reach.

--split prints where a step's time goes (last repeat): steps that run prompt tokens apart from pure
decode / verify steps, and for the latter the trunk forward, the MTP (forward or one-call greedy
drafting), the logits and the rest (engine work).

Rollback study (--rollback): a verify forward of B x (k+1) tokens keeping per-position DeltaNet
states (per_token_state_slots) vs. the recompute alternative (save the states, run the same forward
without per-position states, then restore and re-run the accepted tokens).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qwen3next.engine import EngineArgs, LLMEngine  # noqa: E402
from qwen3next.sampling_params import SamplingParams  # noqa: E402

# process CPU time by default: on a shared machine other jobs' load inflates wall time at random
CLOCK = time.process_time
DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "qwen3next", "demo_model")


def make_prompts(model_dir: str, vocab: int, n: int, seed: int = 0) -> tuple[list[list[int]], str]:
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        try:
            from qwen3next.tokenizer import get_tokenizer
            from qwen3next.train.data import generate

            tok = get_tokenizer(model_dir)
            convs = generate(n, seed)
            return [tok.apply_chat_template(c.messages[:-1], tools=c.tools, add_generation_prompt=True,
                                            tokenize=True) for c in convs], "synthetic chat tasks"
        except Exception as e:  # a tokenizer without a chat template: random ids below
            print(f"(chat prompts unavailable: {e})")
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(16, 129, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lens], "random ids"


class Split:
    """CPU time of each step, split into steps with prompt tokens and decode steps; in decode steps
    also the trunk forward, the MTP and the logits (timers on the model's entry points)."""

    PARTS = ("trunk", "mtp", "logits")

    def __init__(self, model):
        self.on = False
        self.t: dict[str, float] = {}
        self.reset()
        for obj, name, part in ((model, "forward", "trunk"), (model, "compute_logits", "logits"),
                                (model.mtp, "forward", "mtp"), (model.mtp, "draft_greedy", "mtp")):
            setattr(obj, name, self._timed(getattr(obj, name), part))

    def reset(self) -> None:
        self.t = {p: 0.0 for p in (*self.PARTS, "decode", "prompt")}
        self.n = {"decode": 0, "prompt": 0}

    def _timed(self, fn, part):
        def g(*a, **kw):
            t = CLOCK()
            r = fn(*a, **kw)
            if self.on:
                self.t[part] += CLOCK() - t
            return r
        return g

    def step(self, eng, concurrency: int) -> list:
        s = eng.scheduler
        prompt = (bool(s.waiting) and len(s.running) < concurrency) or any(
            q.num_tokens - q.num_computed_tokens > 1 for q in s.running)
        self.on = not prompt
        t = CLOCK()
        outs = eng.step()
        kind = "prompt" if prompt else "decode"
        self.t[kind] += CLOCK() - t
        self.n[kind] += 1
        self.on = False
        return outs

    def line(self) -> str:
        n, t = self.n["decode"], self.t
        if not n:
            return "no decode steps"
        per = {p: t[p] / n * 1e3 for p in self.PARTS}
        rest = t["decode"] / n * 1e3 - sum(per.values())
        return (f"decode steps {n}: {t['decode'] / n * 1e3:.2f} ms each = " + ", ".join(f"{p} {v:.2f}" for p, v in
                per.items()) + f", rest {rest:.2f}; steps with prompt tokens {self.n['prompt']}: "
                f"{t['prompt'] * 1e3:.0f} ms in all")


def run(model, prompts, k: int, concurrency: int, max_tokens: int, eos: list[int], oracle=None,
        disable_by_batch_size: int | None = None, sampling: bool = False, split: Split | None = None):
    """-> (seconds, generated tokens, outputs, spec stats or None). oracle: outputs to draft from."""
    spec = {"method": "qwen3_next_mtp", "num_speculative_tokens": k} if k else None
    if spec and disable_by_batch_size:
        spec["disable_by_batch_size"] = disable_by_batch_size
    eng = LLMEngine(model, EngineArgs(max_num_seqs=concurrency, max_num_batched_tokens=2048,
                                      max_model_len=min(2048, model.config.max_position_embeddings),
                                      speculative_config=spec), eos_token_ids=eos)
    p = SamplingParams(temperature=0, max_tokens=max_tokens)
    if sampling:  # the demo model's generation_config.json defaults
        p = [SamplingParams(temperature=0.6, top_p=0.95, top_k=20, seed=i, max_tokens=max_tokens)
             for i in range(len(prompts))]
    eng.add_request("warm", prompts[0][:8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    if eng.spec is not None:
        eng.spec.stats = type(eng.spec.stats)(k)
    if oracle is not None:
        def drafts(logits, seqs):
            toks = []
            for s in seqs:
                ref, j = oracle[int(s.request.request_id)], s.num_output_tokens + len(s.spec_token_ids)
                toks.append(ref[j] if j < len(ref) else 0)
            return toks, [None] * len(seqs)

        eng.spec.proposer._sample = drafts
    out = {str(i): [] for i in range(len(prompts))}
    t = CLOCK()
    for i, pr in enumerate(prompts):
        eng.add_request(str(i), pr, p[i] if sampling else p)
    if split is not None:
        split.reset()
    while eng.has_unfinished_requests():
        for o in (eng.step() if split is None else split.step(eng, concurrency)):
            out[o.request_id] += o.outputs[0].token_ids
    dt = CLOCK() - t
    outs = [out[str(i)] for i in range(len(prompts))]
    return dt, sum(map(len, outs)), outs, (eng.stats.get("spec_decode") if k else None)


@torch.inference_mode()
def rollback_study(model, B: int, k: int, ctx: int = 64, reps: int = 5) -> None:
    """Per-position states in one verify forward vs. recompute after the verify."""
    from qwen3next.engine.cache import CacheManager, plan_cache
    from qwen3next.engine.sequence import Request, Sequence
    from qwen3next.engine.spec_batch import pack

    spec = model.state_spec()
    plan = plan_cache(spec, torch.float32, 16, B * (2 + k), 1 << 40, max_blocks=B * (ctx // 16 + 2))
    cm = CacheManager(spec, plan, torch.float32, torch.device("cpu"), ctx + 16, num_scratch_slots=B * (1 + k))
    V = model.config.vocab_size
    seqs = []
    for i in range(B):
        s = Sequence(i, Request(str(i), torch.randint(0, V, (ctx,)).tolist(), SamplingParams(), frozenset(), 10**6),
                     0, torch.device("cpu"))
        cm.allocate_slot(s)
        cm.grow(s, ctx + k + 1)
        seqs.append(s)
    ids, pos, batch = pack(cm, torch.device("cpu"), [(s, 0, s.token_ids) for s in seqs])
    model(ids, pos, batch)  # prefill the context
    runs = [(s, ctx, torch.randint(0, V, (k + 1,)).tolist()) for s in seqs]
    scratch = [cm.scratch_base + r * k + j for r in range(B) for j in range(k)]
    backup = [cm.scratch_base + B * k + r for r in range(B)]
    slots = torch.tensor([s.slot for s in seqs])
    layers = (*cm.cache.conv.values(), *cm.cache.recurrent.values())

    def verify(per_token: bool):
        ids, pos, batch = pack(cm, torch.device("cpu"), runs)
        if per_token:
            batch.per_token_state_slots = torch.tensor(
                [scratch[r * k + j] if j < k else -1 for r in range(B) for j in range(k + 1)])
        model(ids, pos, batch)

    def recompute(accepted: int):
        for t in layers:
            t[torch.tensor(backup)] = t[slots]
        verify(False)
        for t in layers:
            t[slots] = t[torch.tensor(backup)]
        ids, pos, batch = pack(cm, torch.device("cpu"), [(s, c, toks[:accepted + 1]) for s, c, toks in runs])
        model(ids, pos, batch)

    def timed(fn, *a):
        fn(*a)
        t = CLOCK()
        for _ in range(reps):
            fn(*a)
        return (CLOCK() - t) / reps * 1000

    t_pt = timed(verify, True)
    t_plain = timed(verify, False)
    print(f"rollback study, B={B}, k={k}, context {ctx}:")
    print(f"  verify with per-position states       {t_pt:8.1f} ms/step  (+{k} state slots per sequence)")
    print(f"  verify without (chunked kernel)       {t_plain:8.1f} ms/step")
    for a in (0, k):
        print(f"  recompute: verify + redo {a + 1} token(s)   {timed(recompute, a):8.1f} ms/step  "
              "(+1 state slot per sequence)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint dir (default: the demo model, else a tiny random one)")
    ap.add_argument("--ks", default="0,1,2,3", help="num_speculative_tokens values (0: no MTP)")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--requests-per-slot", type=int, default=2, help="requests = concurrency x this")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least contention on a shared CPU)")
    ap.add_argument("--rollback", action="store_true", help="also run the rollback study")
    ap.add_argument("--wall", action="store_true", help="time by wall clock instead of process CPU time")
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting (median tok/s, range)")
    ap.add_argument("--oracle", action="store_true", help="also run with perfect drafts (acceptance 1)")
    ap.add_argument("--sampling", action="store_true",
                    help="the demo model's sampling defaults instead of greedy (seeded per request)")
    ap.add_argument("--split", action="store_true", help="where a step's time goes (see the module docstring)")
    ap.add_argument("--disable-by-batch-size", type=int, default=None,
                    help="speculative_config.disable_by_batch_size for the k > 0 runs")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.wall:
        global CLOCK
        CLOCK = time.perf_counter
    from qwen3next.config import ModelConfig
    from qwen3next.loader import load_model

    tmp = None
    model_dir = a.model
    if model_dir is None and os.path.isfile(os.path.join(DEMO, "config.json")):
        model_dir = DEMO
    if model_dir is None:
        from tests.helpers.checkpoints import make_tiny_checkpoint

        tmp = tempfile.TemporaryDirectory()
        model_dir = make_tiny_checkpoint(tmp.name, with_tokenizer=False)
    model, cfg = load_model(model_dir, dtype=torch.float32, device="cpu", with_mtp=True, progress=False)
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    try:
        from qwen3next.engine.llm_engine import read_generation_config

        gen_eos = read_generation_config(model_dir).get("eos_token_id")
        if gen_eos is not None:
            eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
    except ValueError:
        pass
    ks = [int(x) for x in a.ks.split(",")]
    conc = [int(x) for x in a.concurrency.split(",")]
    split = Split(model) if a.split else None
    print(f"model {os.path.relpath(model_dir) if tmp is None else 'tiny random checkpoint'}, "
          f"torch threads {torch.get_num_threads()}, max_tokens {a.max_tokens}, "
          f"{'wall' if a.wall else 'process CPU'} time, {'sampling defaults' if a.sampling else 'greedy'}")
    for c in conc:
        n = c * a.requests_per_slot
        prompts, kind = make_prompts(model_dir, ModelConfig.from_dir(model_dir).vocab_size, n)
        print(f"\nconcurrency {c}: {n} requests ({kind})")
        print(f"  {'k':>2} {'tok/s':>8} {'range':>11} {'speed-up':>8} {'mean acc. len':>13} {'accept/pos':>22} {'same as k=0':>11}")
        plan = [(k, False) for k in ks] + ([(k, True) for k in ks if k] if a.oracle else [])
        if 0 not in ks:
            plan.insert(0, (0, False))
        rates: dict = {p: [] for p in plan}
        last: dict = {}
        splits: dict = {}
        ref = None
        for _ in range(a.repeat):  # interleaved, so a change in the machine's load hits every k
            for k, oracle in plan:
                dt, ntok, outs, st = run(model, prompts, k, c, a.max_tokens, eos, ref if oracle else None,
                                         a.disable_by_batch_size, a.sampling, split)
                if split is not None:
                    splits[(k, oracle)] = split.line()
                ref = outs if k == 0 else ref
                rates[(k, oracle)].append(ntok / dt)
                last[(k, oracle)] = (outs, st)
        base = statistics.median(rates[(0, False)])
        for k, oracle in plan:
            outs, st = last[(k, oracle)]
            same = sum((len(x) == len(y)) if a.sampling else (x == y) for x, y in zip(outs, ref))
            acc = "-" if st is None else " ".join(f"{r:.2f}" for r in st["acceptance_rate_per_pos"])
            mal = "-" if st is None else f"{st['mean_accepted_length']:.2f}"
            tag = f"{k}{'*' if oracle else ''}"
            med = statistics.median(rates[(k, oracle)])
            spread = f"{min(rates[(k, oracle)]):.0f}-{max(rates[(k, oracle)]):.0f}"
            print(f"  {tag:>2} {med:8.1f} {spread:>11} {med / base:7.2f}x {mal:>13} {acc:>22} "
                  f"{same:>6}/{len(outs)}")
        if a.oracle:
            print("  (* oracle drafts: acceptance 1)")
        for (k, oracle), line in splits.items():
            print(f"  k={k}{'*' if oracle else ''}: {line}")
    if a.rollback:
        print()
        rollback_study(model, 16, max(ks[-1], 1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
