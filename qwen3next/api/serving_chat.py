"""POST /v1/chat/completions: messages -> prompt ids -> engine -> message or SSE chunks.

Render with the model's chat template, check the context, submit one engine request (n samples),
and turn each sample's ids into text (`TextStream`) and then into reasoning / content / tool calls
(`ChoiceParser`). tool_choice "required" or a named function is *guided by prefill*: the start of
a `<tool_call>` block in the tool parser's format is appended to the prompt (Instruct) or, for
Thinking templates, after the model's own `</think>` (`forced_tools`), and the rest of a hermes call
follows the tools' schemas (a grammar when llguidance is there: api/structured.forced_call for
hermes, parsers/qwen3_coder_grammar for qwen3_coder); the parser sees the prefill as output.
`prompt_logprobs: k` (vLLM extra, not with stream) returns the rendered prompt's logprobs as a
top-level `prompt_logprobs` list in vLLM's form. response_format / structured_outputs / guided_*
constrain the content (api/structured.py): for a Thinking prompt only after the model's `</think>`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import jinja2

from qwen3next.api.chat_output import ChoiceParser, merge_call_deltas, prompt_logprobs_json, token_logprobs
from qwen3next.api.errors import APIError, bad_request, error_body
from qwen3next.api.forced_tools import reason_then_call
from qwen3next.api.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                    ChatCompletionResponse, ChoiceLogprobs,
                                    CompletionTokensDetails, DeltaMessage, PromptTokensDetails, Usage,
                                    now, random_id)
from qwen3next.api.serving_common import (SSE_DONE, ServerState, check_model, max_new_tokens,
                                          sampling_params, sse, truncation, until_disconnect)
from qwen3next.api.structured import forced_call, structured_outputs
from qwen3next.engine.structured_output import available as grammar_available
from qwen3next.parsers.qwen3_coder_grammar import coder_forced_call
from qwen3next.parsers.tool_parsers import forced_call_prefix
from qwen3next.api.text_stream import TextStream
from qwen3next.api.validate import check_chat, template_messages


class _Choice:
    """Per-sample state: text stream, parser, metrics timer, and how it ended."""

    def __init__(self, state: ServerState, req: ChatCompletionRequest, index: int, prompt_len: int,
                 reasoning: bool, tools: bool, prefix: str, single_call: bool):
        tok = state.tokenizer
        self.index = index
        self.text = TextStream(tok, req.stop if isinstance(req.stop, list) else
                               ([req.stop] if req.stop else None), req.skip_special_tokens,
                               req.include_stop_str_in_output, req.min_tokens)
        self.parser = ChoiceParser(reasoning=reasoning, tools=tools, prefix=prefix,
                                   parallel=req.parallel_tool_calls is not False and not single_call,
                                   strip_newlines=state.strip_reasoning_newlines,
                                   tool_parser=state.tool_parser or "hermes", tool_defs=req.tools)
        self.timer = state.metrics.timer(prompt_len if index == 0 else 0)
        self.eos_ids = state.eos_ids
        self.include_stop = req.include_stop_str_in_output
        # tokens before </think> count as reasoning
        self.think_end = tok.token_to_id("</think>") if reasoning else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list = []
        self.num_tokens = 0
        # prompt tokens the engine found in its prefix cache (choice 0 keeps the request's count)
        self.cached_tokens: int | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def absorb(self, out, tok, want_logprobs: bool, top: int, as_ids: bool = False) -> tuple[str, list]:
        """One CompletionOutput step -> (released text, logprob entries)."""
        ids = out.token_ids
        if (out.finish_reason == "stop" and ids and not self.include_stop
                and (ids[-1] in self.eos_ids or ids[-1] == out.stop_reason)):
            ids = ids[:-1]  # the EOS / stop token itself is not part of the text
        # a forced tool call's prefill reads as output text but is not a completion token
        text = self.text.add(ids, getattr(out, "forced_ids", ()))
        # a stop string inside a speculative step: the tokens after it are not output (as in plain decoding)
        n = self.text.taken if self.text.stopped is not None else len(out.token_ids)
        self.num_tokens += n
        self.timer.token(n)
        lps = token_logprobs(tok, out.token_ids[:n], out.logprobs, top, as_ids) if want_logprobs else []
        self.logprobs += lps
        if self.text.stopped is not None:
            self.finish_reason, self.stop_reason = "stop", self.text.stopped
        elif out.finish_reason is not None:
            self.finish_reason = "stop" if out.finish_reason == "abort" else out.finish_reason
            self.stop_reason = out.stop_reason
            text += self.text.finish()
        if self.done:
            self.timer.finish(self.finish_reason)
        return text, lps

    @property
    def reasoning_tokens(self) -> int:
        if self.think_end is None:
            return 0
        ids = self.text.token_ids
        return ids.index(self.think_end) if self.think_end in ids else len(ids)


def build_prompt(state: ServerState, req: ChatCompletionRequest) -> tuple[list[int], str, bool, bool, bool]:
    """-> (prompt ids, forced-call text, thinking template, reasoning split on, tool parsing on)."""
    tok = state.tokenizer
    if not state.trust_request_chat_template and (
            req.chat_template is not None or (req.chat_template_kwargs or {}).get("chat_template") is not None):
        raise bad_request("Chat template is passed with request, but --trust-request-chat-template is not set. "
                          "Refused request with untrusted chat template.", "chat_template")
    messages = template_messages(req)
    choice = req.tool_choice or ("auto" if req.tools else "none")
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []] or None
    if choice == "none" and state.exclude_tools_when_none:
        tools = None
    try:
        text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=req.add_generation_prompt,
                                       chat_template=req.chat_template,
                                       continue_final_message=req.continue_final_message,
                                       **(req.chat_template_kwargs or {}))
    except (jinja2.TemplateError, ValueError, TypeError) as e:
        raise bad_request(f"chat template failed to render: {e}", "messages") from None
    thinking = text.endswith("<think>\n")
    # split only when the prompt opened a think block: an Instruct-style prompt has no </think> to
    # wait for (vLLM would file its whole answer as reasoning); the request may switch it either way
    wanted = req.separate_reasoning if req.separate_reasoning is not None else state.reasoning_parser is not None
    reasoning = wanted and thinking
    call = ""  # guided by prefill: the start of the call (in the parser's format) the model must complete
    if choice == "required" or not isinstance(choice, str):
        call = forced_call_prefix(state.tool_parser or "hermes", None if isinstance(choice, str) else
                                  choice.function.name, grammar_available())
    ids = tok.encode(text if thinking else text + call)
    keep = truncation(state, req.truncate_prompt_tokens)
    if keep is not None:
        ids = ids[-keep:]
    tools_on = state.tool_parser is not None and choice != "none" and bool(req.tools)
    # Thinking: the call is prefilled after the model's own </think> (forced_tools); else right away
    return ids, ("\n\n" + call if thinking else call) if call else "", thinking, reasoning, tools_on


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, raw_request):
    check_chat(req, state.vocab_size)
    model = check_model(state, req.model)
    # off the event loop: rendering 100k messages or tokenizing 20 MB takes seconds, and every other
    # client (streams, /health) would wait that long
    ids, call, thinking, reasoning, tools_on = await asyncio.to_thread(build_prompt, state, req)
    budget = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = max_new_tokens(state, len(ids), budget, param, "messages")
    top = req.top_logprobs or 0
    # a Thinking prompt: the grammar starts after the model's </think> (the content is constrained)
    structured = structured_outputs(req, state.tokenizer.token_to_id("</think>") if thinking else None)
    if structured is not None and call:
        raise bad_request("response_format / structured outputs cannot be combined with a forced "
                          "tool_choice ('required' or a named function)", "tool_choice")
    if call:  # the rest of the call follows the tools' schemas (Thinking: phase 2 only)
        name = None if req.tool_choice == "required" else req.tool_choice.function.name
        end_id = state.tokenizer.token_to_id("</tool_call>")
        try:
            forced = (coder_forced_call(req.tools, name, end_id) if state.tool_parser == "qwen3_coder"
                      else forced_call(req.tools, name, end_id))
        except ValueError as e:
            raise bad_request(str(e), "tools") from None
        structured = None if thinking else forced
    params = sampling_params(state, req, max_tokens, top if req.logprobs else None, req.prompt_logprobs,
                             structured)
    rid = req.request_id or random_id("chatcmpl")
    prefix = call if not thinking else ""  # what the parser must see before the model's output
    single = bool(call) and req.tool_choice != "required"  # a named function: exactly one call
    choices = [_Choice(state, req, i, len(ids), reasoning, tools_on, prefix, single)
               for i in range(req.n)]
    if call and thinking:
        gen = reason_then_call(state.engine, rid, ids, params, state.tokenizer.token_to_id("</think>"),
                               state.tokenizer.encode(call), forced)
    else:
        gen = state.engine.generate(rid, ids, params)
    if req.stream:
        return _stream(state, req, rid, model, ids, choices, gen)
    return await until_disconnect(raw_request, _full(state, req, rid, model, ids, choices, gen))


async def _steps(state, req, choices, gen, prompt_lps: list | None = None
                 ) -> AsyncIterator[tuple[_Choice, str, list]]:
    """Yield (choice, text delta, logprobs) per engine step until every choice is done; the
    engine's prompt logprobs, when they come, are appended to `prompt_lps`."""
    async for out in gen:
        if choices[0].cached_tokens is None:  # the first output: the user's prompt's count
            choices[0].cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None and prompt_lps is not None:
            prompt_lps.append(out.prompt_logprobs)
        for co in out.outputs:
            c = choices[co.index]
            if c.done:
                continue  # stopped by a stop string
            text, lps = c.absorb(co, state.tokenizer, req.logprobs, req.top_logprobs or 0,
                                 req.return_tokens_as_token_ids)
            if c.text.stopped is not None and co.finish_reason is None:
                index = getattr(co, "engine_index", None)
                state.engine.stop_sample(out.request_id, co.index if index is None else index, c.text.stopped)
            yield c, text, lps
        if all(c.done for c in choices):
            break


def _usage(prompt_len: int, choices: list[_Choice]) -> Usage:
    completion = sum(c.num_tokens for c in choices)
    details = None
    if choices[0].parser.reasoning:
        details = CompletionTokensDetails(reasoning_tokens=sum(c.reasoning_tokens for c in choices))
    cached = choices[0].cached_tokens
    return Usage(prompt_tokens=prompt_len, completion_tokens=completion,
                 total_tokens=prompt_len + completion, completion_tokens_details=details,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached) if cached else None)


def _echo(req: ChatCompletionRequest) -> str:
    """vLLM `echo`: the last message's content is repeated in the output when it is the assistant's."""
    last = req.messages[-1]
    return last.content if req.echo and last.role == "assistant" and isinstance(last.content, str) else ""


async def _full(state, req, rid, model, ids, choices, gen) -> dict:
    echo = _echo(req)
    prompt_lps: list = []
    try:
        async for _ in _steps(state, req, choices, gen, prompt_lps):
            pass
    finally:
        await gen.aclose()  # aborts the request if it is still running (stop string, disconnect)
    out = []
    for c in choices:
        message, called = c.parser.final(c.text.text, req.include_reasoning)
        if echo:
            message.content = echo + (message.content or "")
        reason = "tool_calls" if called else c.finish_reason
        out.append(ChatChoice(index=c.index, message=message, finish_reason=reason, stop_reason=c.stop_reason,
                              logprobs=ChoiceLogprobs(content=c.logprobs) if req.logprobs else None))
    resp = ChatCompletionResponse(id=rid, model=model, choices=out, usage=_usage(len(ids), choices))
    if req.prompt_logprobs is not None and prompt_lps:
        resp.prompt_logprobs = prompt_logprobs_json(state.tokenizer, prompt_lps[0])
    return resp.model_dump(exclude_none=False)


async def _stream(state, req, rid, model, ids, choices, gen) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    # vLLM extra: every chunk carries the usage so far
    continuous = include_usage and bool(req.stream_options.continuous_usage_stats)

    def chunk(index: int, delta: DeltaMessage, logprobs: ChoiceLogprobs | None = None,
              finish_reason: str | None = None, stop_reason: int | str | None = None) -> str:
        # = sse(ChatCompletionChunk(...)) key for key, built as a dict: this runs once per token
        # per stream, and the pydantic round trip was half of the chunk's cost
        choice: dict = {"index": index, "delta": delta.model_dump(exclude_none=True)}
        if logprobs is not None:
            choice["logprobs"] = logprobs.model_dump(exclude_none=True)
        if finish_reason is not None:
            choice["finish_reason"] = finish_reason
        if stop_reason is not None:
            choice["stop_reason"] = stop_reason
        body = {"id": rid, "object": "chat.completion.chunk", "created": now(), "model": model, "choices": [choice]}
        if continuous:
            body["usage"] = _usage(len(ids), choices).model_dump(exclude_none=True)
        return sse(body)

    try:
        for c in choices:
            yield chunk(c.index, DeltaMessage(role="assistant", content=_echo(req)))
        async for c, text, lps in _steps(state, req, choices, gen):
            delta = c.parser.feed(text, req.include_reasoning)
            logprobs = ChoiceLogprobs(content=lps) if req.logprobs and lps else None
            if c.done:
                tail = c.parser.flush(req.include_reasoning)
                delta = _merge(delta, tail)
                reason = c.parser.stream_finish_reason(c.finish_reason)
                yield chunk(c.index, delta or DeltaMessage(), logprobs=logprobs, finish_reason=reason,
                            stop_reason=c.stop_reason)
            elif delta is not None or logprobs is not None:
                yield chunk(c.index, delta or DeltaMessage(), logprobs=logprobs)
        if include_usage:
            usage = _usage(len(ids), choices)
            yield sse(ChatCompletionChunk(id=rid, model=model, choices=[], usage=usage))
    except APIError as e:
        yield sse(e.body())
    except Exception as e:  # noqa: BLE001 - the stream has started: report in-band, end cleanly
        yield sse(error_body(f"internal error: {e}", 500))
    finally:
        await gen.aclose()
    yield SSE_DONE


def _merge(a: DeltaMessage | None, b: DeltaMessage | None) -> DeltaMessage | None:
    if a is None or b is None:
        return a or b
    merged = a.model_dump(exclude_none=True)
    for key, value in b.model_dump(exclude_none=True).items():
        if key == "tool_calls":
            merged[key] = merge_call_deltas(merged.get(key, []) + value)
        elif isinstance(value, str):
            merged[key] = merged.get(key, "") + value
    return DeltaMessage.model_validate(merged)

