"""POST /v1/completions: raw prompts (text or token ids, no template) -> text, whole or streamed.

Each prompt is one engine request with `n` samples; choice index = prompt_index * n + sample
(vLLM). No reasoning or tool parsing. `logprobs: k` returns the legacy
{tokens, token_logprobs, top_logprobs, text_offset} layout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from qwen3next.api.chat_output import token_logprobs
from qwen3next.api.errors import APIError
from qwen3next.api.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                                    CompletionResponse, Usage, random_id)
from qwen3next.api.serving_common import (SSE_DONE, ServerState, check_model, max_new_tokens,
                                          sampling_params, sse, until_disconnect)
from qwen3next.api.text_stream import TextStream
from qwen3next.api.validate import check_completion, prompt_list


class _Sample:
    def __init__(self, state: ServerState, req: CompletionRequest, index: int, prompt_len: int,
                 echo: str):
        self.index = index
        stops = [req.stop] if isinstance(req.stop, str) else req.stop
        self.text = TextStream(state.tokenizer, stops, req.skip_special_tokens, req.include_stop_str_in_output)
        self.timer = state.metrics.timer(prompt_len)
        self.echo = echo
        self.eos_ids = state.eos_ids
        self.include_stop = req.include_stop_str_in_output
        self.finish_reason: str | None = None
        self.stop_reason = None
        self.num_tokens = 0
        self.logprobs = CompletionLogprobs()
        self._lp_sent = 0  # logprob entries already streamed

    def new_logprobs(self) -> CompletionLogprobs:
        """The entries gathered since the last call (streaming)."""
        lp, k = self.logprobs, self._lp_sent
        self._lp_sent = len(lp.tokens)
        return CompletionLogprobs(tokens=lp.tokens[k:], token_logprobs=lp.token_logprobs[k:],
                                  top_logprobs=lp.top_logprobs[k:], text_offset=lp.text_offset[k:])

    def absorb(self, out, state: ServerState, top: int | None, as_ids: bool = False) -> str:
        self.num_tokens += len(out.token_ids)
        self.timer.token(len(out.token_ids))
        ids = out.token_ids
        if (out.finish_reason == "stop" and ids and not self.include_stop
                and (ids[-1] in self.eos_ids or ids[-1] == out.stop_reason)):
            ids = ids[:-1]
        offset = len(self.echo) + sum(len(t) for t in self.logprobs.tokens)
        text = self.text.add(ids)
        if top is not None:
            lp = self.logprobs
            for entry in token_logprobs(state.tokenizer, out.token_ids, out.logprobs, top, as_ids):
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


async def create_completion(state: ServerState, req: CompletionRequest, raw_request):
    check_completion(req, state.vocab_size)
    model = check_model(state, req.model)
    tok = state.tokenizer
    rid = req.request_id or random_id("cmpl")
    jobs = []
    for p, prompt in enumerate(prompt_list(req)):
        ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if req.truncate_prompt_tokens is not None:
            ids = ids[-req.truncate_prompt_tokens:]
        max_tokens = max_new_tokens(state, len(ids), req.max_tokens, "max_tokens", "prompt")
        params = sampling_params(state, req, max_tokens, req.logprobs)
        echo = (prompt if isinstance(prompt, str) else tok.decode(ids)) if req.echo else ""
        samples = [_Sample(state, req, p * req.n + i, len(ids) if i == 0 else 0, echo) for i in range(req.n)]
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
    return await until_disconnect(raw_request, _full(req, rid, model, merged, samples, prompt_tokens))


async def _merge(state, req, pairs) -> AsyncIterator[tuple[_Sample, str]]:
    """Interleave the prompts' engine streams: yield (sample, text delta) as outputs arrive."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(gen, samples):
        try:
            async for out in gen:
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
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                 total_tokens=prompt_tokens + completion)


async def _full(req, rid, model, merged, samples, prompt_tokens) -> dict:
    async for _ in merged:
        pass
    choices = [CompletionChoice(index=s.index, text=s.echo + s.text.text, finish_reason=s.finish_reason,
                                stop_reason=s.stop_reason,
                                logprobs=s.logprobs if req.logprobs is not None else None)
               for s in samples]
    return CompletionResponse(id=rid, model=model, choices=choices,
                              usage=_usage(samples, prompt_tokens)).model_dump()


async def _stream(req, rid, model, merged, samples, prompt_tokens) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    try:
        for s in samples:
            if s.echo:
                yield sse(CompletionResponse(id=rid, model=model,
                                             choices=[CompletionChoice(index=s.index, text=s.echo)]))
        async for s, text in merged:
            logprobs = s.new_logprobs() if req.logprobs is not None else None
            if text or s.finish_reason is not None or (logprobs and logprobs.tokens):
                choice = CompletionChoice(index=s.index, text=text, finish_reason=s.finish_reason,
                                          stop_reason=s.stop_reason, logprobs=logprobs)
                yield sse(CompletionResponse(id=rid, model=model, choices=[choice]))
        if include_usage:
            yield sse(CompletionResponse(id=rid, model=model, choices=[], usage=_usage(samples, prompt_tokens)))
    except APIError as e:
        yield sse(e.body())
    finally:
        await merged.aclose()
    yield SSE_DONE
