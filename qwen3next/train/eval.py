"""Score a model on freshly drawn synthetic tasks (a seed different from training's).

Figures: arithmetic exact-answer accuracy; tool-call rate (a valid <tool_call> JSON block) and
correctness (right name and {"city": ...} copied from the question); correct final answers after a
tool response (the returned values and the city in the answer); plain requests answered without a
tool call; and the MTP head's top-1 agreement with the main head's next token (teacher-forced on
whole conversations, at assistant tokens). Generation is greedy through the engine's `LLM` when it
is importable, else a batched cache-less loop over the model (slower, same tokens).
"""

from __future__ import annotations

import json
import random
import re
import time

import torch

from qwen3next.forward_batch import ForwardBatch
from qwen3next.parsers.reasoning import ReasoningParser
from qwen3next.parsers.tool_calls import extract_tool_calls
from qwen3next.tokenizer import get_tokenizer
from qwen3next.train.data import Conversation, generate, make_arith, make_plain, make_tool, with_extras
from qwen3next.train.encode import encode_text, render

_ANSWER_RE = re.compile(r"=\s*(-?\d+)")
_INT_RE = re.compile(r"-?\d+")


# ---- generation ----------------------------------------------------------------------------
@torch.no_grad()
def greedy_cacheless(model, prompts: list[list[int]], max_new: int, stop_ids: set[int], vocab_limit: int,
                     batch_size: int = 32) -> list[list[int]]:
    """Greedy continuation of each prompt, re-running the whole prefix every step (no cache)."""
    outs: list[list[int]] = []
    for b0 in range(0, len(prompts), batch_size):
        seqs = [list(p) for p in prompts[b0 : b0 + batch_size]]
        gen: list[list[int]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        for _ in range(max_new):
            if not active:
                break
            lens = [len(seqs[i]) for i in active]
            ids = torch.tensor([t for i in active for t in seqs[i]])
            pos = torch.cat([torch.arange(n) for n in lens])
            fb = ForwardBatch.full(lens)
            hidden = model(ids, pos, fb)
            logits = model.compute_logits(hidden[fb.cu_seqlens[1:] - 1])  # [B, V] last positions
            logits[:, vocab_limit:] = float("-inf")  # padding rows of the vocabulary
            nxt = logits.argmax(-1).tolist()
            still = []
            for i, t in zip(active, nxt):
                seqs[i].append(t)
                gen[i].append(t)
                if t not in stop_ids and len(gen[i]) < max_new:
                    still.append(i)
            active = still
        outs.extend(gen)
    return outs


class Generator:
    """Greedy generation from token-id prompts, through the engine when available."""

    def __init__(self, path: str, dtype: torch.dtype, batch_size: int):
        self.tok = get_tokenizer(path)
        self.stop_ids = {self.tok.token_to_id("<|im_end|>"), self.tok.token_to_id("<|endoftext|>")}
        self.batch_size = batch_size
        self.llm = None
        try:
            from qwen3next.llm import LLM
            from qwen3next.sampling_params import SamplingParams

            self.llm = LLM(path, dtype=str(dtype).replace("torch.", ""), max_num_seqs=batch_size)
            self._sp = SamplingParams
        except ImportError:  # no engine in this build: the reference loop
            pass
        self.model = None
        if self.llm is None:
            from qwen3next.loader import load_model

            self.model, _ = load_model(path, dtype=dtype, progress=False)
        self.backend = "engine LLM" if self.llm is not None else "cache-less greedy loop"

    def __call__(self, prompts: list[list[int]], max_new: int) -> list[str]:
        if self.llm is not None:
            sp = self._sp(temperature=0.0, max_tokens=max_new, skip_special_tokens=True)
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            return [o.outputs[0].text for o in outs]
        ids = greedy_cacheless(self.model, prompts, max_new, self.stop_ids, len(self.tok), self.batch_size)
        return [self.tok.decode(g, skip_special_tokens=True) for g in ids]


# ---- grading -------------------------------------------------------------------------------
def split_output(text: str) -> tuple[str, str]:
    """Generated text (the prompt ends inside <think>) -> (reasoning, content)."""
    reasoning, content = ReasoningParser(strip_newlines=True).extract(text)
    return reasoning or "", content or ""


def arith_correct(content: str, answer: int) -> bool:
    m = _ANSWER_RE.findall(content) or _INT_RE.findall(content)
    return bool(m) and int(m[-1]) == answer


def tool_call_grade(content: str, name: str, city: str) -> tuple[bool, bool]:
    """(a valid tool-call block was emitted, it is exactly the right single call)."""
    _, calls = extract_tool_calls(content)
    if not calls:
        return False, False
    ok = len(calls) == 1 and calls[0]["function"]["name"] == name
    return True, ok and json.loads(calls[0]["function"]["arguments"]) == {"city": city}


def final_answer_correct(content: str, result: dict) -> bool:
    values = [result["city"]] + ([str(result["temperature_c"]), result["condition"]] if "condition" in result
                                 else [result["time"]])  # fmt: skip
    # whole values only: "3" must not match inside "-3" or "13"
    return all(re.search(rf"(?<![\w-]){re.escape(v)}(?!\w)", content) for v in values)


# ---- the evaluation ------------------------------------------------------------------------
def _prompt(gen: Generator, messages: list[dict], tools) -> list[int]:
    return gen.tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)


@torch.no_grad()
def mtp_agreement(model, tok_backend, convs: list[Conversation]) -> dict:
    """Teacher-forced: MTP's argmax at t (for x_{t+2}) vs the main head's argmax at t+1, at
    assistant tokens; also the MTP's top-1 accuracy against the true x_{t+2}."""
    agree = correct = total = 0
    for conv in convs:
        ids, mask = encode_text(render(conv), tok_backend)
        n = len(ids)
        x = torch.tensor(ids)
        hidden = model(x, torch.arange(n), ForwardBatch.full([n]))
        main_next = model.compute_logits(hidden).argmax(-1)  # [n] prediction of x_{t+1}
        y = model.mtp(x[1:], hidden[:-1], torch.arange(n - 1), ForwardBatch.full([n - 1]))
        mtp_pred = model.compute_logits(y).argmax(-1)  # [n-1] prediction of x_{t+2}
        sel = torch.tensor(mask[2:])  # scored where x_{t+2} is an assistant token
        agree += int((mtp_pred[:-1] == main_next[1:-1])[sel].sum())
        correct += int((mtp_pred[:-1] == x[2:])[sel].sum())
        total += int(sel.sum())
    return {"mtp_agreement": agree / max(total, 1), "mtp_top1_accuracy": correct / max(total, 1), "mtp_tokens": total}


def evaluate(path: str, n: int = 100, seed: int = 12345, batch_size: int = 32,
             dtype: torch.dtype = torch.float32) -> dict:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    from qwen3next.loader import resolve_model_dir

    # a bad path: the loader's one line, not the tokenizer's hub-download error
    path = resolve_model_dir(path)
    t0 = time.time()
    gen = Generator(path, dtype, batch_size)
    rng = random.Random(seed)
    report: dict = {"model": path, "seed": seed, "n": n, "backend": gen.backend}

    # (a) arithmetic, a third of them with tools offered
    ariths = [with_extras(make_arith(rng, tools_offered=rng.random() < 0.3), rng) for _ in range(n)]
    outs = gen([_prompt(gen, c.messages[:-1], c.tools) for c in ariths], 320)
    ok = [arith_correct(split_output(o)[1], c.meta["answer"]) for c, o in zip(ariths, outs)]
    report["arith_accuracy"] = sum(ok) / n

    # (b) tool call, then the answer after the tool's response (given the gold call)
    tools = [with_extras(make_tool(rng), rng) for _ in range(n)]
    outs = gen([_prompt(gen, c.messages[:-3], c.tools) for c in tools], 128)
    grades = [tool_call_grade(split_output(o)[1], c.meta["name"], c.meta["city"]) for c, o in zip(tools, outs)]
    report["tool_call_valid_rate"] = sum(v for v, _ in grades) / n
    report["tool_call_correct_rate"] = sum(c for _, c in grades) / n
    outs = gen([_prompt(gen, c.messages[:-1], c.tools) for c in tools], 128)
    ok = [final_answer_correct(split_output(o)[1], c.meta["result"]) for c, o in zip(tools, outs)]
    report["tool_answer_accuracy"] = sum(ok) / n

    # (c) plain requests with tools offered: no call, the expected answer
    plains = []
    while len(plains) < n:
        c = make_plain(rng)
        if c.meta["kind"] == "plain":
            plains.append(with_extras(c, rng))
    outs = gen([_prompt(gen, c.messages[:-1], c.tools) for c in plains], 128)
    ok = []
    for c, o in zip(plains, outs):
        content = split_output(o)[1]
        ok.append(not extract_tool_calls(content)[1] and c.meta["expect"] in content)
    report["plain_accuracy"] = sum(ok) / n

    # MTP agreement (teacher-forced, reference model: the engine does not expose the MTP logits)
    from qwen3next.loader import load_model

    model = gen.model or load_model(path, dtype=dtype, progress=False)[0]
    if model.mtp is not None:
        report.update(mtp_agreement(model, gen.tok.backend, generate(min(n, 50), seed + 1)))
    report["seconds"] = round(time.time() - t0, 1)
    return report


def format_report(r: dict) -> str:
    pct = lambda k: f"{100 * r[k]:.1f}%" if k in r else "n/a"  # noqa: E731
    return "\n".join([
        f"model: {r['model']}  (seed {r['seed']}, {r['n']} prompts per task, {r['backend']}, {r['seconds']}s)",
        f"arithmetic exact answer          {pct('arith_accuracy')}",
        f"tool call: valid JSON block      {pct('tool_call_valid_rate')}",
        f"tool call: right name + city     {pct('tool_call_correct_rate')}",
        f"answer after tool response       {pct('tool_answer_accuracy')}",
        f"plain request, no tool call      {pct('plain_accuracy')}",
        f"MTP top-1 agreement with main    {pct('mtp_agreement')}",
        f"MTP top-1 accuracy (x_t+2)       {pct('mtp_top1_accuracy')}",
    ])  # fmt: skip
