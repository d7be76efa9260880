"""POST /v1/completions: raw prompts (text or token ids, no template) -> text, whole or streamed.

Each prompt is one engine request with `n` samples; choice index = prompt_index * n + sample
(vLLM). No reasoning or tool parsing. `logprobs: k` returns the legacy
{tokens, token_logprobs, top_logprobs, text_offset} layout; with `echo` it starts with the prompt's
tokens (the first one's logprob null), and `max_tokens: 0` + `echo` returns the prompt alone
(lm-evaluation-harness's loglikelihood requests). `prompt_logprobs: k` (vLLM extra) adds each
choice's `prompt_logprobs` in vLLM's form. response_format / structured_outputs / guided_* constrain
the text from its first token (api/structured.py). The echoed prompt travels with the first engine output,
which carries the prompt logprobs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from qwen3next.api.chat_output import prompt_logprobs_json, token_logprobs
from qwen3next.api.errors import APIError
from qwen3next.api.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                                    CompletionResponse, PromptTokensDetails, Usage, random_id)
from qwen3next.api.serving_common import (SSE_DONE, ServerState, check_model, max_new_tokens,
                                          sampling_params, sse, truncation, until_disconnect)
from qwen3next.api.structured import structured_outputs
from qwen3next.api.text_stream import TextStream
from qwen3next.api.validate import check_completion, prompt_list


class _Sample:
    def __init__(self, state: ServerState, req: CompletionRequest, index: int, prompt_len: int,
                 echo: str, prompt_ids: list[int]):
        self.index = index
        stops = [req.stop] if isinstance(req.stop, str) else req.stop
        self.text = TextStream(state.tokenizer, stops, req.skip_special_tokens, req.include_stop_str_in_output,
                               req.min_tokens)
        self.timer = state.metrics.timer(prompt_len)
        self.echo = echo
        self.echo_pending = req.echo  # the echo goes out with the first output
        # prompt tokens the engine found in its prefix cache (counted on each prompt's sample 0)
        self.cached_tokens: int | None = None
        self.echo_only = req.echo and req.max_tokens == 0  # the engine samples one token: dropped
        self.prompt_ids = prompt_ids
        self.prompt_logprobs = None  # the engine's, when asked (set by the first output)
        self.eos_ids = state.eos_ids
        self.include_stop = req.include_stop_str_in_output
        self.finish_reason: str | None = None
        self.stop_reason = None
        self.num_tokens = 0
        self.logprobs = CompletionLogprobs()
        self._lp_sent = 0  # logprob entries already streamed
        self._num_echoed = 0  # leading logprob entries that are the prompt's

    def new_logprobs(self) -> CompletionLogprobs:
        """The entries gathered since the last call (streaming)."""
        lp, k = self.logprobs, self._lp_sent
        self._lp_sent = len(lp.tokens)
        return CompletionLogprobs(tokens=lp.tokens[k:], token_logprobs=lp.token_logprobs[k:],
                                  top_logprobs=lp.top_logprobs[k:], text_offset=lp.text_offset[k:])

    def absorb(self, out, state: ServerState, top: int | None, as_ids: bool = False) -> str:
        prefix = ""
        if self.echo_pending:
            self.echo_pending = False
            prefix = self.echo
            if top is not None:
                self._echo_logprobs(state.tokenizer, top, as_ids)
        if self.echo_only:
            if out.finish_reason is not None:
                self.finish_reason = "length"
                self.timer.finish(self.finish_reason)
            return prefix
        ids = out.token_ids
        if (out.finish_reason == "stop" and ids and not self.include_stop
                and (ids[-1] in self.eos_ids or ids[-1] == out.stop_reason)):
            ids = ids[:-1]
        lp = self.logprobs
        # generated tokens' offsets count from the end of the echoed text
        offset = len(self.echo) + sum(len(t) for t in lp.tokens[self._num_echoed:])
        text = prefix + self.text.add(ids)
        # a stop string inside a speculative step: the tokens after it are not output (as in plain decoding)
        n = self.text.taken if self.text.stopped is not None else len(out.token_ids)
        self.num_tokens += n
        self.timer.token(n)
        if top is not None:
            for entry in token_logprobs(state.tokenizer, out.token_ids[:n], out.logprobs, top, as_ids):
                lp.text_offset.append(offset)
                offset += len(entry.token)
                lp.tokens.append(entry.token)
                lp.token_logprobs.append(entry.logprob)
                lp.top_logprobs.append({t.token: t.logprob for t in entry.top_logprobs})
        if self.text.stopped is not None:
            self.finish_reason, self.stop_reason = "stop", self.text.stopped
        elif out.finish_reason is not None:
            self.finish_reason = "stop" if out.finish_reason == "abort" else out.finish_reason
            self.stop_reason = out.stop_reason
            text += self.text.finish()
        if self.finish_reason is not None:
            self.timer.finish(self.finish_reason)
        return text


    def _echo_logprobs(self, tok, top: int, as_ids: bool) -> None:
        """The prompt's tokens as the first logprob entries: the first with null logprobs, the
        rest from the engine's prompt logprobs (top-`top` by rank)."""
        ids, plp = self.prompt_ids, self.prompt_logprobs
        if plp is None:  # (aborted before the prompt completed)
            return
        lp = self.logprobs
        first = f"token_id:{ids[0]}" if as_ids else tok.decode([ids[0]], skip_special_tokens=False)
        rest = token_logprobs(tok, ids[1:], plp[1:], top, as_ids)
        lp.tokens.append(first)
        lp.token_logprobs.append(None)
        lp.top_logprobs.append(None)
        lp.text_offset.append(0)
        offset = len(first)
        for entry in rest:
            lp.text_offset.append(offset)
            offset += len(entry.token)
            lp.tokens.append(entry.token)
            lp.token_logprobs.append(entry.logprob)
            lp.top_logprobs.append({t.token: t.logprob for t in entry.top_logprobs})
        self._num_echoed = len(ids)


async def create_completion(state: ServerState, req: CompletionRequest, raw_request):
    check_completion(req, state.vocab_size)
    model = check_model(state, req.model)
    tok = state.tokenizer
    rid = req.request_id or random_id("cmpl")
    structured = structured_outputs(req)  # (raw prompts: constrained from the first token)
    jobs = []
    prompts = prompt_list(req)
    keep = truncation(state, req.truncate_prompt_tokens)
    # off the event loop (a 20 MB prompt tokenizes for seconds; other clients would wait)
    encoded = await asyncio.to_thread(lambda: [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts])
    for p, (prompt, ids) in enumerate(zip(prompts, encoded)):
        if keep is not None:
            ids = ids[-keep:]
        # echo with max_tokens 0: vLLM runs one token and returns the prompt alone
        budget = 1 if req.echo and req.max_tokens == 0 else req.max_tokens
        max_tokens = max_new_tokens(state, len(ids), budget, "max_tokens", "prompt")
        # vLLM: echo with logprobs asks the engine for the prompt's logprobs at the same k
        plp = req.prompt_logprobs
        if plp is None and req.echo and req.logprobs is not None:
            plp = req.logprobs
        params = sampling_params(state, req, max_tokens, req.logprobs, plp, structured)
        echo = (prompt if isinstance(prompt, str) else tok.decode(ids)) if req.echo else ""
        samples = [_Sample(state, req, p * req.n + i, len(ids) if i == 0 else 0, echo, ids)
                   for i in range(req.n)]
        jobs.append((f"{rid}-{p}", ids, params, samples))
    gens = []
    try:
        for job_id, ids, params, _ in jobs:
            gens.append(state.engine.generate(job_id, ids, params))
    except APIError:
        for g in gens:
            await g.aclose()
        raise
    merged = _merge(state, req, [(g, job[3]) for g, job in zip(gens, jobs)])
    prompt_tokens = sum(len(job[1]) for job in jobs)
    samples = [s for job in jobs for s in job[3]]
    if req.stream:
        return _stream(req, rid, model, merged, samples, prompt_tokens)
    return await until_disconnect(raw_request, _full(state, req, rid, model, merged, samples, prompt_tokens))


async def _merge(state, req, pairs) -> AsyncIterator[tuple[_Sample, str]]:
    """Interleave the prompts' engine streams: yield (sample, text delta) as outputs arrive."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(gen, samples):
        try:
            async for out in gen:
                if samples[0].cached_tokens is None:
                    samples[0].cached_tokens = out.num_cached_tokens
                if out.prompt_logprobs is not None:  # (the request's first output)
                    for s in samples:
                        s.prompt_logprobs = out.prompt_logprobs
                for co in out.outputs:
                    s = samples[co.index]
                    if s.finish_reason is None:
                        text = s.absorb(co, state, req.logprobs, req.return_tokens_as_token_ids)
                        if s.text.stopped is not None and co.finish_reason is None:
                            state.engine.stop_sample(out.request_id, co.index, s.text.stopped)
                        await q.put((s, text))
                if all(s.finish_reason is not None for s in samples):
                    break
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await q.put(e)
        finally:
            await gen.aclose()
            await q.put(None)

    tasks = [asyncio.ensure_future(pump(g, s)) for g, s in pairs]
    try:
        left = len(tasks)
        while left:
            item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


def _usage(samples, prompt_tokens: int) -> Usage:
    completion = sum(s.num_tokens for s in samples)
    cached = sum(s.cached_tokens or 0 for s in samples)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                 total_tokens=prompt_tokens + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached) if cached else None)


async def _full(state, req, rid, model, merged, samples, prompt_tokens) -> dict:
    async for _ in merged:
        pass
    tok = state.tokenizer
    choices = [CompletionChoice(index=s.index, text=s.echo + s.text.text, finish_reason=s.finish_reason,
                                stop_reason=s.stop_reason,
                                logprobs=s.logprobs if req.logprobs is not None else None,
                                prompt_logprobs=None if req.prompt_logprobs is None or s.prompt_logprobs is None
                                else prompt_logprobs_json(tok, s.prompt_logprobs))
               for s in samples]
    return CompletionResponse(id=rid, model=model, choices=choices,
                              usage=_usage(samples, prompt_tokens)).model_dump()


async def _stream(req, rid, model, merged, samples, prompt_tokens) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    # vLLM extra: every chunk carries the usage so far
    continuous = include_usage and bool(req.stream_options.continuous_usage_stats)
    try:
        async for s, text in merged:
            logprobs = s.new_logprobs() if req.logprobs is not None else None
            if text or s.finish_reason is not None or (logprobs and logprobs.tokens):
                choice = CompletionChoice(index=s.index, text=text, finish_reason=s.finish_reason,
                                          stop_reason=s.stop_reason, logprobs=logprobs)
                usage = _usage(samples, prompt_tokens) if continuous else None
                yield sse(CompletionResponse(id=rid, model=model, choices=[choice], usage=usage))
        if include_usage:
            yield sse(CompletionResponse(id=rid, model=model, choices=[], usage=_usage(samples, prompt_tokens)))
    except APIError as e:
        yield sse(e.body())
    finally:
        await merged.aclose()
    yield SSE_DONE
