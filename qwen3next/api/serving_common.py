"""What chat and completions share: the server state, model-name and context-length checks,
request -> SamplingParams, SSE framing, and racing a handler against the client's disconnect.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from pydantic import BaseModel

from qwen3next.api.async_engine import AsyncEngine
from qwen3next.api.errors import APIError, bad_request
from qwen3next.api.metrics import Metrics
from qwen3next.api.protocol import SamplingFields
from qwen3next.sampling_params import SamplingParams, StructuredOutputsParams


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: object  # qwen3next.tokenizer.Tokenizer
    served_names: list[str]
    model_path: str
    max_model_len: int
    vocab_size: int
    metrics: Metrics
    reasoning_parser: str | None = None  # "qwen3" | "deepseek_r1" | None (all text is content)
    tool_parser: str | None = "hermes"  # "hermes" | "qwen3_coder" | None (calls stay in content); "auto" resolved at start
    generation_config: dict = field(default_factory=dict)  # defaults for unset sampling fields
    api_key: str | None = None
    exclude_tools_when_none: bool = False
    strip_reasoning_newlines: bool = False
    # a request's own chat_template is Jinja the server runs (one with nested loops blocks it): opt-in
    trust_request_chat_template: bool = False
    # CORS (vLLM's defaults: any origin, method and header, no credentials), for browser clients
    cors: dict = field(default_factory=lambda: {"allow_origins": ["*"], "allow_methods": ["*"],
                                                "allow_headers": ["*"], "allow_credentials": False})
    eos_ids: frozenset = frozenset()
    cache_tokens: int | None = None  # tokens one sequence may hold in the KV cache (None: no limit)


def check_model(state: ServerState, name: str | None) -> str:
    """The served name to echo back; unknown names -> 404 as vLLM does."""
    if name is None:
        return state.served_names[0]
    if name not in state.served_names:
        raise APIError(f"The model `{name}` does not exist.", 404, "model")
    return name


def truncation(state: ServerState, requested: int | None) -> int | None:
    """vLLM's truncate_prompt_tokens: -1 (any negative) = max_model_len; above it is a 400."""
    if requested is None:
        return None
    if requested < 0:
        return state.max_model_len
    if requested > state.max_model_len:
        raise bad_request(f"truncate_prompt_tokens value ({requested}) is greater than max_model_len "
                          f"({state.max_model_len}). Please, select a smaller truncation size.",
                          "truncate_prompt_tokens")
    return requested


def max_new_tokens(state: ServerState, prompt_len: int, requested: int | None, param: str,
                   prompt_param: str) -> int:
    """Output budget within the context; over-long prompts or budgets -> 400 (openai_api.md §6)."""
    limit = state.max_model_len
    if prompt_len >= limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens. However, your "
                          f"request has {prompt_len} input tokens. Please reduce the length of the "
                          "input messages.", prompt_param)
    room = limit - prompt_len
    if requested is None:
        # default: the rest of the context, but no more than the cache can hold for one sequence
        # (the last sampled token is never cached, hence + 1)
        if state.cache_tokens is not None:
            room = min(room, state.cache_tokens + 1 - prompt_len)
        if room < 1:
            raise bad_request(f"The prompt ({prompt_len} tokens) does not fit in the KV cache "
                              f"({state.cache_tokens} tokens).", prompt_param)
        return room
    if requested > room:
        raise bad_request(f"This model's maximum context length is {limit} tokens. However, you "
                          f"requested {prompt_len + requested} tokens ({prompt_len} in the input, "
                          f"{requested} in the completion). Please reduce the length of the input "
                          f"or the completion.", param)
    return requested


def sampling_params(state: ServerState, req: SamplingFields, max_tokens: int,
                    logprobs: int | None, prompt_logprobs: int | None = None,
                    structured: StructuredOutputsParams | None = None) -> SamplingParams:
    """Request fields -> SamplingParams; fields the client left out take generation_config values."""
    kw = dict(n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens, prompt_logprobs=prompt_logprobs,
              structured_outputs=structured,
              presence_penalty=req.presence_penalty or 0.0,
              frequency_penalty=req.frequency_penalty or 0.0,
              stop=req.stop, stop_token_ids=req.stop_token_ids, seed=req.seed,
              include_stop_str_in_output=req.include_stop_str_in_output, ignore_eos=req.ignore_eos,
              logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
              # JSON keys are strings; api/validate.py checked they are token ids, biases in [-100, 100]
              logit_bias={int(k): float(v) for k, v in req.logit_bias.items()} if req.logit_bias else None)
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if getattr(req, name) is not None:
            kw[name] = getattr(req, name)
    try:
        params = SamplingParams(**kw)
        gen = {k: v for k, v in state.generation_config.items() if k != "max_new_tokens"}
        return params.with_generation_config(gen)
    except ValueError as e:
        raise bad_request(str(e), str(e).split(" ", 1)[0]) from None


# Characters str.splitlines() breaks on that json.dumps(ensure_ascii=False) leaves raw: a client that
# splits the stream with splitlines (httpx's iter_lines does) would cut an event in two.
_LINE_BREAKS = str.maketrans({"\x1c": "\\u001c", "\x1d": "\\u001d", "\x1e": "\\u001e",
                              "\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(obj: BaseModel | dict) -> str:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(exclude_none=True)
    return f"data: {json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def until_disconnect(request, coro):
    """Run `coro`; if the client goes away first, cancel it (its generators abort their requests)."""
    work = asyncio.ensure_future(coro)

    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watcher.cancel()
    if work not in done:
        work.cancel()
        raise APIError("client disconnected", 499)
    return work.result()
