"""The offline facade (vLLM names): `LLM(model=...).generate(prompts, SamplingParams(...))` and
`.chat(messages, ...)`.

Text lives here, above the token-id engine: prompts are encoded, outputs detokenized
incrementally, stop strings searched in the new text (the text is cut at the stop string, vLLM
semantics) and the sample stopped in the engine. Unset SamplingParams fields take the model's
generation_config.json values. Prompt logprobs (SamplingParams.prompt_logprobs) come back on
RequestOutput.prompt_logprobs with each entry's decoded_token filled in. `chat` with structured
outputs and a Thinking template starts the grammar after the model's `</think>`, as the server.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any, Sequence

import torch

from qwen3next.detokenizer import IncrementalDetokenizer
from qwen3next.engine import EngineArgs, LLMEngine
from qwen3next.outputs import CompletionOutput, RequestOutput
from qwen3next.sampling_params import SamplingParams


def decode_logprobs(tokenizer, entries: list) -> None:
    """Fill in decoded_token of every Logprob in `entries` (dicts, or None), in place."""
    if tokenizer is None:
        return
    for d in entries:
        for t, lp in (d or {}).items():
            lp.decoded_token = tokenizer.decode([t], skip_special_tokens=False)


class _Completion:
    """One sample being accumulated: token ids, logprobs, text, stop-string search."""

    def __init__(self, index: int, params: SamplingParams, tokenizer, eos_ids=()):
        self.out = CompletionOutput(index, "", [], None, [] if params.logprobs is not None else None)
        self.params = params
        self.tokenizer = tokenizer
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens) if tokenizer else None
        self.stopped = False  # ended by a stop string: later reports change nothing
        # vLLM: a stop string counts only if it ends in the text after the first min_tokens tokens
        self.check_from = 0
        # vLLM: the token that ended the output (EOS, a stop_token_id) is text only with
        # include_stop_str_in_output
        self.silent_ids = set() if params.include_stop_str_in_output else {*eos_ids, *params.stop_token_ids}

    def add(self, delta: CompletionOutput) -> str | None:
        """Take a step's delta; -> the stop string that ended the text, if one did. The search
        runs after each token, so a step that brought several (speculative decoding) ends, as
        one token per step would, at the token that completes the stop string."""
        if self.stopped:
            return None
        out = self.out
        out.cumulative_logprob = delta.cumulative_logprob
        out.finish_reason, out.stop_reason = delta.finish_reason, delta.stop_reason
        if delta.logprobs is not None:
            decode_logprobs(self.tokenizer, delta.logprobs)
        toks = delta.token_ids
        silent = delta.finish_reason == "stop" and bool(toks) and toks[-1] in self.silent_ids
        for j, t in enumerate(toks):
            out.token_ids.append(t)
            if delta.logprobs is not None:
                out.logprobs.append(delta.logprobs[j])
            if self.detok is None:
                continue
            before = len(out.text)
            if not (silent and j == len(toks) - 1):
                out.text += self.detok.add(t)
            if j == len(toks) - 1 and delta.finish_reason is not None:
                out.text += self.detok.flush()
            if len(out.token_ids) <= self.params.min_tokens:
                self.check_from = len(out.text)
            elif self.params.stop and (stop := self._find_stop(max(before, self.check_from))) is not None:
                if j < len(toks) - 1 and out.cumulative_logprob is not None and delta.logprobs is not None:
                    # (the dropped tokens' logprobs leave the running sum too)
                    out.cumulative_logprob -= sum(d[x].logprob for d, x in zip(delta.logprobs[j + 1:], toks[j + 1:]))
                return stop
        return None

    def _find_stop(self, before: int) -> str | None:
        """The earliest stop string that ends after text offset `before`; cuts the text there."""
        text = self.out.text
        best = None
        for s in self.params.stop:
            i = text.find(s, max(0, before - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.stopped = True
        self.out.text = text[: i + len(s)] if self.params.include_stop_str_in_output else text[:i]
        self.out.finish_reason, self.out.stop_reason = "stop", s
        return s


# vLLM's LLM also takes these dtype spellings (and torch dtypes); EngineArgs knows the canonical names
_DTYPE_ALIASES = {"half": "float16", "float": "float32"}


def _dtype_name(dtype):
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return _DTYPE_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else dtype


def _load_tokenizer(tokenizer: str | None, model: str):
    """-> (tokenizer, its dir: None when it is the model dir's)."""
    from qwen3next.api.engine_setup import tokenizer_path
    from qwen3next.loader import resolve_model_dir
    from qwen3next.tokenizer import get_tokenizer

    path = tokenizer_path(tokenizer)
    return get_tokenizer(path or resolve_model_dir(model)), path


class LLM:
    def __init__(self, model: str, tokenizer: str | None = None, dtype: str = "auto",
                 device: str | None = None, seed: int = 0, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 4096, max_model_len: int | None = None,
                 block_size: int = 16, kv_cache_memory_bytes: int | None = None,
                 gpu_memory_utilization: float = 0.9, enable_chunked_prefill: bool = True,
                 skip_tokenizer_init: bool = False, generation_config: str = "auto",
                 speculative_config: dict | str | None = None, tensor_parallel_size: int = 1,
                 quantization: str | None = None, enable_prefix_caching: bool = False, **engine_kwargs):
        """`engine_kwargs`: the other EngineArgs fields by name (enforce_eager,
        prefix_caching_state_block, prefix_caching_state_fraction, mamba_ssm_cache_dtype, ...), as
        vLLM's LLM passes them on."""
        if generation_config not in ("auto", "vllm"):
            raise ValueError(f"generation_config must be 'auto' or 'vllm', got {generation_config!r}")
        from qwen3next.distributed.parallel_state import tp_size

        if tp_size() > 1:  # layers built now would take the live group's shard sizes and hang
            raise ValueError("a tensor-parallel LLM is alive in this process: shut it down first "
                             "(llm.llm_engine.shutdown(), or del llm)")  # fmt: skip
        unknown = sorted(set(engine_kwargs) - set(EngineArgs.names()))
        if unknown:
            raise ValueError(f"LLM got unknown option(s) {', '.join(unknown)} (not EngineArgs fields)")
        args = EngineArgs(
            model=model, dtype=_dtype_name(dtype), device=device, seed=seed, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            block_size=block_size, kv_cache_memory_bytes=kv_cache_memory_bytes,
            gpu_memory_utilization=gpu_memory_utilization, enable_chunked_prefill=enable_chunked_prefill,
            speculative_config=speculative_config, tensor_parallel_size=tensor_parallel_size,
            quantization=quantization, enable_prefix_caching=enable_prefix_caching, **engine_kwargs,
        )
        self.tokenizer, tokenizer_dir = None, None
        if not skip_tokenizer_init and model is not None:
            # before the (for an 80B, minutes-long) model load: a bad tokenizer path or a model dir
            # without tokenizer files fails at once
            self.tokenizer, tokenizer_dir = _load_tokenizer(tokenizer, model)
        self.llm_engine = LLMEngine.from_args(args)
        if tokenizer_dir is not None:
            from qwen3next.api.engine_setup import use_tokenizer

            use_tokenizer(self.llm_engine, tokenizer_dir)
        # "vllm": ignore the model's generation_config.json for sampling defaults
        self._gen = self.llm_engine.generation_config if generation_config == "auto" else {}
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams().with_generation_config(self._gen)

    # ---- generation -----------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """prompts: a str, {"prompt": str}, {"prompt_token_ids": [...]}, or a list of those."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(p, int) for p in prompts):
            raise ValueError("prompts: pass token ids as {'prompt_token_ids': [...]}")
        parsed = [self._parse_prompt(p) for p in prompts]
        if sampling_params is None:
            params = [self.get_default_sampling_params()] * len(parsed)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params.with_generation_config(self._gen)] * len(parsed)
        else:
            params = [p.with_generation_config(self._gen) for p in sampling_params]
            if len(params) != len(parsed):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(parsed)} prompts")
        vocab = self.llm_engine.vocab_size
        for p in params:
            # (vLLM's check against max_logprobs; here the vocabulary, else top-k fails mid-step)
            for name in ("logprobs", "prompt_logprobs"):
                k = getattr(p, name)
                if k is not None and k > vocab:
                    raise ValueError(f"{name}: requested {k}, which is greater than max allowed: {vocab} "
                                     f"(the vocabulary size)")  # fmt: skip
            if p.stop and self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer (skip_tokenizer_init=True was given)")
        return self._run(parsed, params, use_tqdm)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = False, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False, tools=None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of them; rendered with the chat template."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init=True was given)")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of messages (or of conversations)")
        convs = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in convs:
            text = self.tokenizer.apply_chat_template(
                conv, tools=tools, add_generation_prompt=add_generation_prompt, chat_template=chat_template,
                continue_final_message=continue_final_message, **(chat_template_kwargs or {}),
            )
            prompts.append({"prompt": text})
        if sampling_params is not None:
            many = not isinstance(sampling_params, SamplingParams)
            params = list(sampling_params) if many else [sampling_params] * len(prompts)
            if len(params) == len(prompts):  # (else generate names the mismatch)
                sampling_params = [self._grammar_after_think(p, q["prompt"]) for p, q in zip(params, prompts)]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _grammar_after_think(self, params: SamplingParams, prompt: str) -> SamplingParams:
        """A Thinking prompt (ends in `<think>\\n`) gets its grammar only after the model's
        `</think>`, as the server does (api/structured.py): the reasoning stays free. A copy of
        `params` then; `params` itself when it has no grammar or sets start_after_token_id."""
        so = params.structured_outputs
        end = self.tokenizer.token_to_id("</think>")
        if so is None or so.start_after_token_id is not None or end is None or not prompt.endswith("<think>\n"):
            return params
        out = copy.copy(params)  # (a copy, not dataclasses.replace: keeps which fields were unset)
        out.structured_outputs = dataclasses.replace(so, start_after_token_id=end)
        return out

    # ---- internals ------------------------------------------------------------------------
    def _parse_prompt(self, p) -> tuple[str | None, list[int]]:
        if isinstance(p, str):
            p = {"prompt": p}
        if not isinstance(p, dict):
            raise ValueError(f"prompts: expected a str or a dict, got {type(p).__name__}")
        if "prompt_token_ids" in p:
            ids = p["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return p.get("prompt"), list(ids)
        if "prompt" in p:
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (skip_tokenizer_init=True was given)")
            return p["prompt"], self.tokenizer.encode(p["prompt"])
        raise ValueError("prompts: a dict prompt needs 'prompt' or 'prompt_token_ids'")

    def _run(self, parsed, params, use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        results: dict[str, RequestOutput] = {}
        comps: dict[str, list[_Completion]] = {}
        order = []
        try:
            for (text, ids), p in zip(parsed, params):
                rid = str(next(self._ids))
                engine.add_request(rid, ids, p)
                order.append(rid)
                results[rid] = RequestOutput(rid, text, ids)
                comps[rid] = [_Completion(i, p, self.tokenizer, self.llm_engine.eos_token_ids) for i in range(p.n)]
            bar = None
            if use_tqdm:
                from tqdm import tqdm

                bar = tqdm(total=len(order), desc="Processed prompts")
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.prompt_logprobs is not None:
                        decode_logprobs(self.tokenizer, out.prompt_logprobs)
                        results[out.request_id].prompt_logprobs = out.prompt_logprobs
                    for delta in out.outputs:
                        stop = comps[out.request_id][delta.index].add(delta)
                        if stop is not None:
                            engine.stop_sequence(out.request_id, delta.index, stop)
                    results[out.request_id].num_cached_tokens = out.num_cached_tokens
                    if out.finished:
                        results[out.request_id].finished = True
                        if bar is not None:
                            bar.update(1)
            if bar is not None:
                bar.close()
        except BaseException:
            for rid in order:
                engine.abort_request(rid)
            while engine.has_unfinished_requests():  # drain the abort reports
                engine.step()
            raise
        for rid in order:
            results[rid].outputs = [c.out for c in comps[rid]]
        return [results[rid] for rid in order]
