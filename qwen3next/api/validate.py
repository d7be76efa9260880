"""Request validation: JSON body -> typed request, range checks, and messages ready for the template.

Every failure is an `APIError` 400 naming the field (`param`), e.g. "messages[2].role" or
"top_logprobs", so clients see what to fix. Checks that need the tokenizer or the context length
(prompt too long, max_tokens too large) live in the serving modules.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from qwen3next.api.errors import bad_request
from qwen3next.api.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

MAX_N = 128
MAX_LOGPROBS = 20
# JSON nesting of a request body (tool schemas, arguments, template kwargs); real ones nest < 20
MAX_DEPTH = 128
# pydantic appends union-member tags ("str", "list[str]", "NamedToolChoice") to error locations
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*|dict\[.*|literal\[.*|function-.*|[A-Z]\w*)$")

R = TypeVar("R", bound=BaseModel)


def parse_body(raw: bytes, model: type[R]) -> R:
    """Decode JSON and build `model`; invalid JSON or a wrong type -> 400 with the field's name."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"Request body is not valid JSON: {e}") from None
    except RecursionError:  # e.g. 100k nested arrays: json's C scanner recurses per level
        raise bad_request("Request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object")
    # the template, the schema rewrites and validation recurse per level: bound it before them
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _too_deep(body):
        raise bad_request(f"Request body is nested more than {MAX_DEPTH} levels deep")
    # "\ud800" is valid JSON but no text: the tokenizer and the UTF-8 response writer fail on it
    if _SURROGATE_ESCAPE.search(raw):
        where = _lone_surrogate(body, "")
        if where is not None:
            raise bad_request(f"{where}: string holds a lone UTF-16 surrogate (not valid Unicode)", where)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        # a union (prompt: str | list[str] | ...) reports one error per member: name the deepest,
        # e.g. "prompt[1]" rather than "prompt: should be a valid string" for ["a", 5]
        errors = e.errors()
        err = max(errors, key=lambda x: len(x["loc"]))  # (max keeps the first of equals)
        param = _param_of(err["loc"])
        raise bad_request(f"{param}: {err['msg']}" if param else err["msg"], param) from None


def _too_deep(body: dict) -> bool:
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(value: Any, where: str) -> str | None:
    """The path of the first string (or key) in `value` that is not encodable as UTF-8, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
    elif isinstance(value, dict):
        for k, v in value.items():
            # the path goes into the error body, which must itself be valid UTF-8
            path = (f"{where}.{k}" if where else k).encode("utf-8", "backslashreplace").decode()
            found = _lone_surrogate(k, path)
            found = found if found is not None else _lone_surrogate(v, path)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _lone_surrogate(v, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def _param_of(loc: tuple) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _UNION_TAG.match(part):
            continue
        else:
            out += f".{part}" if out else part
    return out or None


def _check_range(value, name: str, lo=None, hi=None, lo_open=False) -> None:
    if value is None:
        return
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise bad_request(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise bad_request(f"{name} must be <= {hi}, got {value}", name)


def check_sampling(req: SamplingFields, vocab_size: int) -> None:
    """Range checks common to chat and completions."""
    _check_range(req.n, "n", 1, MAX_N)
    _check_range(req.temperature, "temperature", 0.0, 100.0)
    _check_range(req.top_p, "top_p", 0.0, 1.0, lo_open=True)
    if req.top_k is not None and req.top_k < -1:
        raise bad_request(f"top_k must be -1 (off), 0 (off) or positive, got {req.top_k}", "top_k")
    _check_range(req.min_p, "min_p", 0.0, 1.0)
    _check_range(req.presence_penalty, "presence_penalty", -2.0, 2.0)
    _check_range(req.frequency_penalty, "frequency_penalty", -2.0, 2.0)
    _check_range(req.repetition_penalty, "repetition_penalty", 0.0, 10.0, lo_open=True)
    _check_range(req.min_tokens, "min_tokens", 0)
    _check_range(req.seed, "seed", -(2**63), 2**63 - 1)  # int64, as vLLM
    if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens == 0:
        raise bad_request("truncate_prompt_tokens must be -1 (max_model_len) or >= 1, got 0",
                          "truncate_prompt_tokens")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if any(s == "" for s in stops):
        raise bad_request("stop strings must not be empty", "stop")
    for t in req.stop_token_ids or []:
        if not 0 <= t < vocab_size:
            raise bad_request(f"stop_token_ids: {t} is not a token id (vocab size {vocab_size})",
                              "stop_token_ids")
    for key, bias in (req.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise bad_request(f"logit_bias: key {key!r} is not a token id", "logit_bias")
        _check_range(bias, "logit_bias", -100.0, 100.0)
    _check_range(req.prompt_logprobs, "prompt_logprobs", 0, MAX_LOGPROBS)
    if req.prompt_logprobs is not None and req.stream:  # vLLM's rule
        raise bad_request("prompt_logprobs are not available when stream is true", "prompt_logprobs")


def check_chat(req: ChatCompletionRequest, vocab_size: int) -> None:
    check_sampling(req, vocab_size)
    if not req.messages:
        raise bad_request("messages must not be empty", "messages")
    _check_range(req.max_tokens, "max_tokens", 1)
    _check_range(req.max_completion_tokens, "max_completion_tokens", 1)
    _check_range(req.top_logprobs, "top_logprobs", 0, MAX_LOGPROBS)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    if req.continue_final_message and req.add_generation_prompt:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be true",
                          "continue_final_message")
    if req.continue_final_message and req.messages[-1].role != "assistant":
        raise bad_request("continue_final_message needs a final assistant message", "messages")
    choice = req.tool_choice
    if choice is not None and choice != "none" and not req.tools:
        raise bad_request("tool_choice other than 'none' needs tools", "tool_choice")
    if choice is not None and not isinstance(choice, str):
        names = [t.function.name for t in req.tools or []]
        if choice.function.name not in names:
            raise bad_request(f"tool_choice names function {choice.function.name!r}, which is not "
                              f"in tools ({', '.join(names)})", "tool_choice")


def check_completion(req: CompletionRequest, vocab_size: int) -> None:
    check_sampling(req, vocab_size)
    if req.suffix is not None:
        raise bad_request("suffix is not supported", "suffix")
    # max_tokens 0 with echo: the prompt (and its logprobs) alone, lm-eval's loglikelihood call
    _check_range(req.max_tokens, "max_tokens", 0 if req.echo else 1)
    _check_range(req.logprobs, "logprobs", 0, MAX_LOGPROBS)
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of different from n is not supported", "best_of")
    prompts = prompt_list(req)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise bad_request("prompt must not be empty", "prompt")
    if req.n * len(prompts) > MAX_N:
        raise bad_request(f"n times the number of prompts must be <= {MAX_N}", "n")
    for p in prompts:
        for t in p if isinstance(p, list) else []:
            if not 0 <= t < vocab_size:
                raise bad_request(f"prompt: {t} is not a token id (vocab size {vocab_size})", "prompt")


def prompt_list(req: CompletionRequest) -> list:
    """The request's prompts: each a string or a list of token ids."""
    p = req.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
        return [p]
    return list(p)


def _flatten(content: Any, where: str) -> str:
    """String content stays; a list of text parts is joined with "\\n"; other parts -> 400."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, dict) and part.get("type") == "text":
            raise bad_request(f"{where}[{j}].text must be a string", f"{where}[{j}].text")
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_request(f"{where}[{j}]: content part {kind!r} is not supported "
                              "(this model reads text only)", f"{where}[{j}]")
    return "\n".join(texts)


def template_messages(req: ChatCompletionRequest) -> list[dict]:
    """Messages as the chat template wants them (chat_format.md §2, openai_api.md §1.1)."""
    out = []
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant", "tool"):
            raise bad_request(f"{where}.role: unknown role {m.role!r}", f"{where}.role")
        msg: dict[str, Any] = {"role": role, "content": _flatten(m.content, f"{where}.content")}
        if role == "assistant":
            reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
            if reasoning is not None:
                msg["reasoning_content"] = reasoning
            if m.tool_calls:
                msg["tool_calls"] = [_tool_call(tc, f"{where}.tool_calls[{k}]")
                                     for k, tc in enumerate(m.tool_calls)]
        out.append(msg)
    return out


def _tool_call(tc: dict, where: str) -> dict:
    fn = tc.get("function") if isinstance(tc.get("function"), dict) else tc
    name = fn.get("name")
    if not isinstance(name, str):
        raise bad_request(f"{where}.function.name must be a string", f"{where}.function.name")
    args = fn.get("arguments")
    if isinstance(args, str) and args.strip():
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass  # the template prints a string verbatim; better than a 500
    if args is None or (isinstance(args, str) and not args.strip()):
        args = {}  # vLLM: a no-parameter call's empty / null arguments (or "null") are {}
    return {"id": tc.get("id"), "type": "function", "function": {"name": name, "arguments": args}}
