"""POST /v1/responses request -> the chat request the chat path serves (OpenAI's Responses API).

`input` (a string, or items: messages, `function_call` / `function_call_output` / `reasoning`
items of earlier turns) and `instructions` become chat messages; flat Responses tools, tool_choice,
`text.format` and `max_output_tokens` map to their chat fields; vLLM sampling extras (seed, top_k,
...) pass through. There is no server-side storage: `previous_response_id` is a 400. Every bad
field is a 400 naming it (`input[2].content[0]`).
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import StrictBool, StrictInt, StrictStr

from qwen3next.api.errors import bad_request
from qwen3next.api.protocol import ChatCompletionRequest, Number, _Lenient
from qwen3next.api.validate import parse_body

# chat / vLLM sampling fields a Responses request may carry through (vLLM accepts them there too)
PASS_THROUGH = ("seed", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                "stop", "stop_token_ids", "logit_bias", "min_tokens", "ignore_eos", "skip_special_tokens",
                "priority", "cache_salt", "chat_template_kwargs", "include_reasoning", "separate_reasoning")


class ResponsesRequest(_Lenient):
    model: Optional[StrictStr] = None
    input: Union[StrictStr, list[dict[str, Any]]]
    instructions: Optional[StrictStr] = None
    max_output_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: Optional[StrictBool] = None
    reasoning: Optional[dict[str, Any]] = None
    text: Optional[dict[str, Any]] = None
    stream: StrictBool = False
    store: Optional[StrictBool] = None
    previous_response_id: Optional[StrictStr] = None
    user: Optional[StrictStr] = None
    metadata: Optional[dict[str, StrictStr]] = None
    request_id: Optional[StrictStr] = None


def _text(content: Any, where: str, kinds: tuple = ("input_text", "output_text", "text")) -> str:
    """A string, or text parts (input_text / output_text / text) joined with newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of input_text parts", where)
    texts = []
    for j, part in enumerate(content):
        if (not isinstance(part, dict) or part.get("type") not in kinds
                or not isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_request(f"{where}[{j}]: content part {kind!r} is not supported (this model reads "
                              "text only: input_text parts)", f"{where}[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


def _str_field(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{where}.{key} must be a string", f"{where}.{key}")
    return value


def input_messages(req: ResponsesRequest) -> list[dict]:
    """`instructions` + `input` -> chat messages (function_call items join the assistant turn)."""
    messages: list[dict] = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if isinstance(req.input, str):
        return messages + [{"role": "user", "content": req.input}]
    if not req.input:
        raise bad_request("input must not be empty", "input")
    reasoning: str | None = None  # a reasoning item belongs to the assistant turn that follows it
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_request(f"{where}.role: unknown role {role!r}", f"{where}.role")
            msg = {"role": role, "content": _text(item.get("content"), f"{where}.content")}
            if role == "assistant" and reasoning is not None:
                msg["reasoning_content"], reasoning = reasoning, None
            messages.append(msg)
        elif kind == "function_call":
            call = {"id": _str_field(item, "call_id", where), "type": "function",
                    "function": {"name": _str_field(item, "name", where),
                                 "arguments": _str_field(item, "arguments", where)}}
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant" or "tool_calls" not in last and last["content"]:
                last = {"role": "assistant", "content": ""}
                messages.append(last)
            if reasoning is not None:
                last["reasoning_content"], reasoning = reasoning, None
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": _str_field(item, "call_id", where),
                             "content": _text(output, f"{where}.output")})
        elif kind == "reasoning":
            parts = item.get("content") or []
            reasoning = _text(parts if isinstance(parts, list) else [], f"{where}.content", ("reasoning_text",))
        else:
            raise bad_request(f"{where}.type: input item type {kind!r} is not supported (message, "
                              "function_call, function_call_output, reasoning)", f"{where}.type")
    return messages


def _tools(req: ResponsesRequest) -> list[dict] | None:
    if req.tools is None:
        return None
    out = []
    for i, t in enumerate(req.tools):
        if t.get("type") != "function":
            raise bad_request(f"tools[{i}].type: only function tools are supported, got {t.get('type')!r}",
                              f"tools[{i}].type")
        fn = {"name": _str_field(t, "name", f"tools[{i}]")}
        for key in ("description", "parameters", "strict"):
            if t.get(key) is not None:
                fn[key] = t[key]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                          "\"name\": ...}", "tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def _response_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request("text.format.type must be 'text', 'json_object' or 'json_schema'", "text.format.type")
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    return {"type": "json_schema", "json_schema": schema}


def parse_responses_request(raw: bytes) -> tuple[ResponsesRequest, ChatCompletionRequest]:
    """-> (the Responses request, the chat request that serves it)."""
    req = parse_body(raw, ResponsesRequest)
    if req.previous_response_id is not None:
        raise bad_request("previous_response_id is not supported: this server stores no responses "
                          "(send the whole conversation in input)", "previous_response_id")
    body = json.loads(raw)
    chat: dict[str, Any] = {k: body[k] for k in PASS_THROUGH if k in body}
    chat.update(model=req.model, messages=input_messages(req), tools=_tools(req),
                tool_choice=_tool_choice(req.tool_choice), parallel_tool_calls=req.parallel_tool_calls,
                max_completion_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p,
                response_format=_response_format(req.text), stream=req.stream, user=req.user,
                request_id=req.request_id)
    if req.stream:
        chat["stream_options"] = {"include_usage": True}
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise bad_request(f"max_output_tokens must be >= 1, got {req.max_output_tokens}", "max_output_tokens")
    chat_req = parse_body(json.dumps({k: v for k, v in chat.items() if v is not None}).encode(),
                          ChatCompletionRequest)
    return req, chat_req
