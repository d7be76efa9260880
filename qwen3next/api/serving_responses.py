"""POST /v1/responses (OpenAI's Responses API as vLLM serves it), on top of the chat path.

The request becomes a chat request (`responses_input`), served by `create_chat_completion` (same
template, sampling defaults, reasoning split, tool-call parsing, structured outputs); its message
becomes Responses output items: a `reasoning` item (the `<think>` part), a `message` item with
`output_text`, and one `function_call` item per parsed call. A stream is the chat chunk stream
re-framed as Responses events (response.created ... response.completed, each with a
`sequence_number`). finish "length" -> status "incomplete" (incomplete_details max_output_tokens).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

from qwen3next.api.errors import APIError, error_body
from qwen3next.api.protocol import now
from qwen3next.api.responses_input import ResponsesRequest, parse_responses_request
from qwen3next.api.serving_chat import create_chat_completion
from qwen3next.api.serving_common import ServerState, sse


# chat fields -> the Responses fields they came from (for 400s raised on the chat path)
_PARAMS = {"max_completion_tokens": "max_output_tokens", "messages": "input",
           "response_format": "text.format", "response_format.json_schema.schema": "text.format.schema"}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def reasoning_item(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    return {"id": item_id or _id("rs"), "type": "reasoning", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    return {"id": item_id or _id("msg"), "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def call_item(call_id: str, name: str, arguments: str, status: str = "completed",
              item_id: str | None = None) -> dict:
    return {"id": item_id or _id("fc"), "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _usage(chat_usage: dict | None) -> dict | None:
    if not chat_usage:
        return None
    details = chat_usage.get("completion_tokens_details") or {}
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"input_tokens": chat_usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": details.get("reasoning_tokens") or 0},
            "total_tokens": chat_usage["total_tokens"]}


def response_object(req: ResponsesRequest, rid: str, created: int, model: str, output: list[dict],
                    status: str, usage: dict | None) -> dict:
    """The `response` object (echoing the request's settings as OpenAI does)."""
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
    fmt = (req.text or {}).get("format") or {"type": "text"}
    return {"id": rid, "object": "response", "created_at": created, "status": status, "model": model,
            "output": output, "usage": usage, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "tools": req.tools or [],
            "tool_choice": choice, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "reasoning": req.reasoning, "text": {"format": fmt}, "metadata": req.metadata,
            "previous_response_id": None, "store": False, "user": req.user, "truncation": "disabled"}


async def create_response(state: ServerState, raw: bytes, raw_request):
    req, chat = parse_responses_request(raw)
    try:
        result = await create_chat_completion(state, chat, raw_request)
    except APIError as e:  # name the Responses field, not the chat one it was mapped to
        e.param = _PARAMS.get(e.param, e.param)
        raise
    rid, created = _id("resp"), now()
    if req.stream:
        return _stream(req, rid, created, result)
    choice = result["choices"][0]
    msg, finished = choice["message"], choice["finish_reason"]
    status = "incomplete" if finished == "length" else "completed"
    output = []
    if msg.get("reasoning_content"):
        output.append(reasoning_item(msg["reasoning_content"], status))
    if msg.get("content"):
        output.append(message_item(msg["content"], status))
    for tc in msg.get("tool_calls") or []:
        output.append(call_item(tc["id"], tc["function"]["name"], tc["function"]["arguments"]))
    if not output:  # nothing generated: one empty message
        output.append(message_item("", status))
    return response_object(req, rid, created, result["model"], output, status, _usage(result.get("usage")))


class _Events:
    """Numbers the events and frames them as SSE (`event: <type>` + `data: <json>`)."""

    def __init__(self):
        self.seq = 0

    def __call__(self, type_: str, **fields) -> str:
        body = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {type_}\n" + sse(body)


async def _stream(req: ResponsesRequest, rid: str, created: int, chunks: AsyncIterator[str]
                  ) -> AsyncIterator[str]:
    ev = _Events()
    model = req.model
    output: list[dict] = []  # finished items
    open_item: dict | None = None  # the item being streamed: {"kind", "id", "text", ...}
    status, usage = "completed", None

    def snapshot(state: str) -> dict:
        return response_object(req, rid, created, model, list(output), state, usage)

    def close(item_status: str = "completed") -> list[str]:
        nonlocal open_item
        if open_item is None:
            return []
        o, open_item, index = open_item, None, len(output)
        if o["kind"] == "reasoning":
            item = reasoning_item(o["text"], item_status, o["id"])
            part = item["content"][0]
            out = [ev("response.reasoning_text.done", item_id=o["id"], output_index=index, content_index=0,
                      text=o["text"]),
                   ev("response.content_part.done", item_id=o["id"], output_index=index, content_index=0,
                      part=part)]
        elif o["kind"] == "message":
            item = message_item(o["text"], item_status, o["id"])
            part = item["content"][0]
            out = [ev("response.output_text.done", item_id=o["id"], output_index=index, content_index=0,
                      text=o["text"], logprobs=[]),
                   ev("response.content_part.done", item_id=o["id"], output_index=index, content_index=0,
                      part=part)]
        else:
            # a call cut before its end (EOS, max_output_tokens) has arguments that are no JSON
            item = call_item(o["call_id"], o["name"], o["text"], "completed" if _is_json(o["text"]) else "incomplete",
                             o["id"])
            out = [ev("response.function_call_arguments.done", item_id=o["id"], output_index=index,
                      name=o["name"], arguments=o["text"])]
        output.append(item)
        return out + [ev("response.output_item.done", output_index=index, item=item)]

    def open_(kind: str, **extra) -> list[str]:
        nonlocal open_item
        out = close()
        index = len(output)
        if kind == "reasoning":
            open_item = {"kind": kind, "id": _id("rs"), "text": ""}
            item = reasoning_item("", "in_progress", open_item["id"])
            item["content"] = []
            part = {"type": "reasoning_text", "text": ""}
        elif kind == "message":
            open_item = {"kind": kind, "id": _id("msg"), "text": ""}
            item = message_item("", "in_progress", open_item["id"])
            item["content"] = []
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            open_item = {"kind": kind, "id": _id("fc"), "text": "", **extra}
            item = call_item(extra["call_id"], extra["name"], "", "in_progress", open_item["id"])
            part = None
        out.append(ev("response.output_item.added", output_index=index, item=item))
        if part is not None:
            out.append(ev("response.content_part.added", item_id=open_item["id"], output_index=index,
                          content_index=0, part=part))
        return out

    def text(kind: str, delta: str) -> list[str]:
        out = open_(kind) if open_item is None or open_item["kind"] != kind else []
        open_item["text"] += delta
        index = len(output)
        if kind == "reasoning":
            return out + [ev("response.reasoning_text.delta", item_id=open_item["id"], output_index=index,
                             content_index=0, delta=delta)]
        return out + [ev("response.output_text.delta", item_id=open_item["id"], output_index=index,
                         content_index=0, delta=delta, logprobs=[])]

    try:
        async for frame in chunks:
            data = frame[len("data: "):].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:  # the chat stream reports engine errors in-band
                err = chunk["error"]
                yield ev("error", code=str(err.get("code")), message=err.get("message"), param=err.get("param"))
                return
            model = chunk.get("model", model)
            if model is not None and ev.seq == 0:
                yield ev("response.created", response=snapshot("in_progress"))
                yield ev("response.in_progress", response=snapshot("in_progress"))
            if chunk.get("usage") and not chunk.get("choices"):
                usage = _usage(chunk["usage"])
            for ch in chunk.get("choices") or []:
                delta = ch.get("delta") or {}
                for kind, key in (("reasoning", "reasoning_content"), ("message", "content")):
                    if delta.get(key):
                        for s in text(kind, delta[key]):
                            yield s
                for tc in delta.get("tool_calls") or []:
                    fn = tc.get("function") or {}
                    if tc.get("id"):
                        for s in open_("call", call_id=tc["id"], name=fn.get("name", "")):
                            yield s
                    if fn.get("arguments") and open_item is not None and open_item["kind"] == "call":
                        open_item["text"] += fn["arguments"]
                        yield ev("response.function_call_arguments.delta", item_id=open_item["id"],
                                 output_index=len(output), delta=fn["arguments"])
                if ch.get("finish_reason") == "length":
                    status = "incomplete"
        for s in close("incomplete" if status == "incomplete" else "completed"):
            yield s
        if not output:  # nothing generated: still one (empty) message, as the non-streaming form
            for s in open_("message") + close(status):
                yield s
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        yield ev(kind, response=snapshot(status))
    except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
        body = error_body(f"internal error: {e}", 500)["error"]
        yield ev("error", code="500", message=body["message"], param=None)
    finally:
        await chunks.aclose()
