"""Hermes-style tool calls: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` -> OpenAI calls.

Text in, structured out (engine-agnostic). A block whose JSON is not an object with a string `name`
stays in the content verbatim, tags included; so does a block cut by max_tokens (unclosed and not
valid JSON). Content is the text outside valid blocks, with the whitespace that touches a valid
block removed, the pieces joined by "\n" (None if nothing is left). `arguments` is
`json.dumps(arguments, ensure_ascii=False)`.
Streaming (`ToolCallStream`) announces a call (index, id, type, name) once `"arguments": ` is
reached and then streams the raw argument text as fragments, as vLLM's hermes parser does for this
format; with `stream_arguments=False` each call is sent whole when its block closes.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from qwen3next.parsers.reasoning import partial_tag_len

TOOL_START = "<tool_call>"
TOOL_END = "</tool_call>"
_BLOCK_RE = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
# The model's (template's) format: the name first, then arguments; at least one char of them seen
_HEADER_RE = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_call_body(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON string) of one block's text, or None if it is not a valid call."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    return obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False)


def _json_string(literal: str) -> str | None:
    try:
        return json.loads(literal)
    except ValueError:
        return None


def _without_outer_close(raw: str) -> str:
    """Streamed arguments hold back what may be the outer object's `}` and the whitespace around it."""
    raw = raw.rstrip()
    return raw[:-1].rstrip() if raw.endswith("}") else raw


def make_call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def split_tool_calls(text: str, parse_block, id_factory=new_call_id) -> tuple[str | None, list[dict]]:
    """Whole-text parse of `<tool_call>` blocks, the block format's `parse_block(body, closed)` ->
    (name, arguments JSON) or None: (content or None, [call, ...]). A block that does not parse stays
    in the content; the text around calls is joined by newlines, trimmed next to each call."""
    pieces: list[str | dict] = []  # text pieces and calls, in order
    pos = 0
    for m in _BLOCK_RE.finditer(text):
        closed = m.group(1) is not None
        parsed = parse_block(m.group(1) if closed else m.group(2), closed)
        if parsed is None:
            continue  # stays in the text between valid calls
        pieces.append(text[pos : m.start()])
        pieces.append(make_call(id_factory(), *parsed))
        pos = m.end()
    pieces.append(text[pos:])
    texts = []
    for i, p in enumerate(pieces):
        if isinstance(p, str):
            p = p.lstrip() if i > 0 else p
            texts.append(p.rstrip() if i < len(pieces) - 1 else p)
    return "\n".join(t for t in texts if t) or None, [p for p in pieces if isinstance(p, dict)]


def extract_tool_calls(text: str, id_factory=new_call_id) -> tuple[str | None, list[dict]]:
    """Whole-text parse of hermes calls: (content or None, [call, ...])."""
    return split_tool_calls(text, lambda body, closed: parse_call_body(body), id_factory)


@dataclass
class ToolDelta:
    """What one streamed text delta produced: content text and OpenAI-style tool-call deltas."""

    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


class ToolCallStream:
    """Feed text deltas; get `ToolDelta`s. `finish()` at the end of output flushes what is held."""

    # a call cut by the end of output: hermes sends the rest of its raw JSON; a format that parses
    # its arguments parameter by parameter (qwen3_coder) sends only the finished ones
    FINISH_CUT_CALLS = True

    def __init__(self, id_factory=new_call_id, stream_arguments: bool = True):
        self._new_id = id_factory
        self._stream_args = stream_arguments
        self.calls: list[dict] = []  # finished or in-progress calls, in the whole-parse format
        self._in_block = False
        self._buf = ""  # text mode: a possible partial <tool_call>; block mode: the block's text so far
        self._ws_hold = ""  # trailing whitespace of the content, dropped if a valid call follows
        self._block_ws = ""  # that whitespace while the block is undecided
        self._after_call = False  # strip leading whitespace of the content that follows a call
        self._emitted = False  # some content was sent
        self._args_start = -1  # announced call: where its raw arguments start in _buf
        self._args_sent = 0

    def feed(self, delta: str) -> ToolDelta:
        out = ToolDelta()
        self._buf += delta
        while True:
            if not self._in_block:
                start = self._buf.find(TOOL_START)
                if start < 0:
                    keep = partial_tag_len(self._buf, TOOL_START)
                    out.content += self._emit(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    return out
                out.content += self._emit(self._buf[:start])
                self._buf = self._buf[start + len(TOOL_START) :]
                self._in_block, self._block_ws, self._ws_hold = True, self._ws_hold, ""
            end = self._buf.find(TOOL_END)
            if end < 0:
                self._stream_block(out, final=False)
                return out
            rest = self._buf[end + len(TOOL_END) :]
            self._buf = self._buf[:end]
            self._close_block(out, closed=True)
            self._buf = rest

    def finish(self) -> ToolDelta:
        out = ToolDelta()
        if self._in_block:
            self._close_block(out, closed=False)
        else:
            out.content += self._emit(self._buf, final=True)
        self._buf = ""
        return out

    # ---- content ----
    def _emit(self, text: str, final: bool = False) -> str:
        text = self._ws_hold + text
        if self._after_call:
            text = text.lstrip()
            if text:
                self._after_call = False
                # text on both sides of a call: keep them apart with one newline
                text = "\n" + text if self._emitted else text
        core = text if final else text.rstrip()
        self._ws_hold = text[len(core) :]
        self._emitted = self._emitted or bool(core)
        return core

    # ---- blocks ----
    def _stream_block(self, out: ToolDelta, final: bool) -> None:
        """Announce the call once its header is complete, then send the safe part of the arguments."""
        if not self._stream_args:
            return
        if self._args_start < 0:
            m = _HEADER_RE.match(self._buf)
            name = _json_string(m.group(1)) if m else None
            if not name:
                return  # not (yet) the usual format: the block is decided whole when it closes
            self._args_start, self._args_sent, self._block_ws = m.end(), 0, ""
            index = len(self.calls)
            self.calls.append(make_call(self._new_id(), name, ""))
            call = self.calls[-1]
            out.tool_calls.append({"index": index, "id": call["id"], "type": "function",
                                   "function": {"name": call["function"]["name"]}})  # fmt: skip
        raw = self._buf[self._args_start :]
        if not final:
            raw = raw[: len(raw) - partial_tag_len(raw, TOOL_END)]
        safe = _without_outer_close(raw)
        if len(safe) > self._args_sent:
            fragment = safe[self._args_sent :]
            self._args_sent = len(safe)
            self.calls[-1]["function"]["arguments"] += fragment
            out.tool_calls.append({"index": len(self.calls) - 1, "function": {"arguments": fragment}})

    def _parse_whole(self, body: str, closed: bool) -> tuple[str, str] | None:
        """A block that was never announced, decided whole: (name, arguments JSON) or None."""
        return parse_call_body(body)

    def _reset_call(self) -> None:
        """Per-call state of a subclass's format, cleared when a block closes (hermes has none)."""

    def _close_block(self, out: ToolDelta, closed: bool) -> None:
        """The block's text is complete in _buf: finish the announced call, or decide it whole."""
        if self._args_start >= 0:
            self._stream_block(out, final=closed or self.FINISH_CUT_CALLS)
            self._after_call = True
        else:
            parsed = self._parse_whole(self._buf, closed)
            if parsed is not None:
                call = make_call(self._new_id(), *parsed)
                self.calls.append(call)
                out.tool_calls.append({"index": len(self.calls) - 1, **call})
                self._after_call = True
            else:
                self._ws_hold = self._block_ws
                raw = TOOL_START + self._buf + (TOOL_END if closed else "")
                out.content += self._emit(raw, final=not closed)
        self._in_block, self._block_ws, self._args_start, self._buf = False, "", -1, ""
        self._reset_call()
