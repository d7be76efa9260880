"""Qwen3-Coder XML tool calls -> OpenAI calls (vLLM's `--tool-call-parser qwen3_coder`).

The model writes `<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n...</function>\\n
</tool_call>`. Values are text; `convert_value` reads each by the request's tool schema (integer,
number, boolean, object, array, null by the parameter's `type`; strings verbatim minus the one newline
the format puts on each side; parameters or tools the request does not declare stay strings).
`arguments` is the JSON object of the parameters in the order written (`json.dumps` spacing,
non-ASCII kept). Blocks and content follow the hermes parser (tool_calls.py): a block cut before its
`</function>` (max_tokens) stays content verbatim; a block closed by `</tool_call>` may leave out
`</function>` and `</parameter>`, as vLLM reads it. The stream announces a call at `<function=NAME>`,
then sends each parameter as one argument fragment once it is complete, and `}` at `</function>`.
"""

from __future__ import annotations

import ast
import json
import math
import re

from qwen3next.parsers.tool_calls import (
    ToolCallStream,
    ToolDelta,
    make_call,
    new_call_id,
    split_tool_calls,
)

FUNC_END = "</function>"
PARAM_START = "<parameter="
PARAM_END = "</parameter>"
_HEAD_RE = re.compile(r"\s*<function=([^<>\n]+)>")  # a name holds no tag and no newline
_INT_RE = re.compile(r"-?\d+")
_NUMBER_RE = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_ALIASES = {"int": "integer", "float": "number", "double": "number", "bool": "boolean", "dict": "object",
            "list": "array", "str": "string"}
_MISS = object()


def tool_schemas(tools) -> dict[str, dict]:
    """{function name: its parameters' `properties`} of the request's tools (dicts or pydantic models)."""
    out: dict[str, dict] = {}
    for t in tools or ():
        t = t.model_dump() if callable(getattr(t, "model_dump", None)) else t
        fn = t.get("function", t) if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            out[fn["name"]] = {k: deref(v, params) for k, v in props.items()} if isinstance(props, dict) else {}
    return out


_DEFS = ("$defs", "definitions")


def deref(schema, root: dict, depth: int = 0):
    """`schema` with a local `$ref` ("#/$defs/X" or "#/definitions/X" of the parameters `root`, as
    pydantic writes nested models) replaced by its target, in its anyOf / oneOf members too, so that
    the value's type can be read from it."""
    if not isinstance(schema, dict) or depth > 16:
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str):
        for key in _DEFS:
            prefix = f"#/{key}/"
            defs = root.get(key)
            target = defs.get(ref[len(prefix):]) if ref.startswith(prefix) and isinstance(defs, dict) else None
            if isinstance(target, dict):
                rest = {k: v for k, v in schema.items() if k != "$ref"}
                return deref({**target, **rest}, root, depth + 1)
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            schema = {**schema, key: [deref(sub, root, depth + 1) for sub in schema[key]]}
    return schema


def schema_types(schema) -> list[str]:
    """The JSON types a parameter's schema names: `type` (a string or a list), or its anyOf / oneOf."""
    if not isinstance(schema, dict):
        return []
    t = schema.get("type")
    names = [t] if isinstance(t, str) else [x for x in t if isinstance(x, str)] if isinstance(t, list) else []
    out = [_ALIASES.get(n.strip().lower(), n.strip().lower()) for n in names]
    for key in ("anyOf", "oneOf"):
        subs = schema.get(key)
        for sub in subs if isinstance(subs, list) else ():
            out += schema_types(sub)
    return out


def _read_number(s: str, integer: bool):
    if _INT_RE.fullmatch(s):
        return int(s)
    if integer or not _NUMBER_RE.fullmatch(s):
        return _MISS
    value = float(s)
    return value if math.isfinite(value) else _MISS


def _read_container(s: str, kind: type):
    try:
        value = json.loads(s)
    except (ValueError, RecursionError):
        # the model may write a Python literal ({'a': True}); literal_eval evaluates no code
        try:
            value = ast.literal_eval(s)
            json.dumps(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return _MISS
    return value if isinstance(value, kind) else _MISS


def convert_value(text: str, schema) -> object:
    """One parameter's text -> its JSON value under its schema (None: not declared, stays a string).
    Non-string types are tried in the schema's order; text none of them reads stays a string."""
    if schema is None:
        return text
    types = schema_types(schema)
    s = text.strip()
    if s.lower() == "null" and ("null" in types or "string" not in types):
        return None
    for t in types:
        if t in ("integer", "number"):
            value = _read_number(s, t == "integer")
        elif t == "boolean":
            value = s.lower() == "true" if s.lower() in ("true", "false") else _MISS
        elif t in ("object", "array"):
            value = _read_container(s, dict if t == "object" else list)
        else:
            continue
        if value is not _MISS:
            return value
    return text


def _one_newline_off(value: str) -> str:
    # the format puts one newline after <parameter=...> and one before </parameter>
    value = value.removeprefix("\n")
    return value.removesuffix("\n")


def next_param(body: str, pos: int, hint: int = 0, final: bool = False):
    """The next item of a function's body from `pos`: ("param", name, text, next pos), ("end", next pos)
    at `</function>`, ("bad",) for a parameter tag with no usable name, or None: more text is needed.
    A value ends at `</parameter>`, or (the model may leave that out) at the next parameter or at
    `</function>`; with `final` (the block was closed) the body's end closes both.
    `hint`: no end of the value lies before it (a caller scanning a growing text)."""
    p = body.find(PARAM_START, pos)
    e = body.find(FUNC_END, pos, p if p >= 0 else len(body))
    if e >= 0:
        return ("end", e + len(FUNC_END))
    if p < 0:
        return ("end", len(body)) if final else None
    name_at = p + len(PARAM_START)
    gt = body.find(">", name_at)
    raw_name = body[name_at : gt if gt >= 0 else len(body)]
    if "<" in raw_name or "\n" in raw_name or (gt >= 0 and not raw_name.strip()):
        return ("bad",)
    if gt < 0:
        return ("bad",) if final else None
    start = max(gt + 1, hint)
    ends = [i for i in (body.find(m, start) for m in (PARAM_END, PARAM_START, FUNC_END)) if i >= 0]
    if not ends and not final:
        return None
    end = min(ends) if ends else len(body)
    after = end + len(PARAM_END) if body.startswith(PARAM_END, end) else end
    return ("param", raw_name.strip(), _one_newline_off(body[gt + 1 : end]), after)


def json_pair(name: str, text: str, props: dict | None) -> str:
    """`"name": value` of one parameter, its value read by the tool's schema for it."""
    value = convert_value(text, props.get(name) if props is not None else None)
    return json.dumps(name, ensure_ascii=False) + ": " + json.dumps(value, ensure_ascii=False)


def parse_block(body: str, schemas: dict[str, dict], closed: bool) -> tuple[str, str] | None:
    """(name, arguments JSON) of one `<tool_call>` block's text (`closed`: by `</tool_call>`), or None
    if it holds no complete call. Text after `</function>` inside the block is ignored."""
    m = _HEAD_RE.match(body)
    if m is None or not m.group(1).strip():
        return None
    name, pos, pairs = m.group(1).strip(), m.end(), []
    while True:
        item = next_param(body, pos, final=closed)
        if item is None or item[0] == "bad":
            return None
        if item[0] == "end":
            return name, "{" + ", ".join(pairs) + "}"
        pairs.append(json_pair(item[1], item[2], schemas.get(name)))
        pos = item[3]


def extract_coder_tool_calls(text: str, tools=None, id_factory=new_call_id) -> tuple[str | None, list[dict]]:
    """Whole-text parse: (content or None, [call, ...]); content as the hermes parser builds it."""
    schemas = tool_schemas(tools)
    return split_tool_calls(text, lambda body, closed: parse_block(body, schemas, closed), id_factory)


class CoderToolCallStream(ToolCallStream):
    """The hermes stream's content and block handling (tool_calls.py), with this format's blocks:
    feed text deltas, get `ToolDelta`s; `finish()` at the end of output flushes what is held."""

    FINISH_CUT_CALLS = False

    def __init__(self, tools=None, id_factory=new_call_id, stream_arguments: bool = True):
        super().__init__(id_factory, stream_arguments)
        self._schemas = tool_schemas(tools)
        self._reset_call()

    def _reset_call(self) -> None:
        self._pos = 0  # announced call: where the next parameter may start in _buf
        self._hint = 0  # no end of the current value lies before this position
        self._pairs = 0
        self._done = False  # `</function>` seen, or a broken parameter tag: nothing more to send

    def _stream_block(self, out: ToolDelta, final: bool) -> None:
        """Announce the call once `<function=NAME>` is complete, then send each finished parameter."""
        if not self._stream_args:
            return
        if self._args_start < 0:
            m = _HEAD_RE.match(self._buf)
            if m is None or not m.group(1).strip():
                return  # not (yet) this format: the block is decided whole when it closes
            self._reset_call()
            self._args_start, self._pos, self._block_ws = m.end(), m.end(), ""
            self.calls.append(make_call(self._new_id(), m.group(1).strip(), ""))
            call = self.calls[-1]
            out.tool_calls.append({"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                                   "function": {"name": call["function"]["name"]}})  # fmt: skip
        while not self._done:
            item = next_param(self._buf, self._pos, self._hint, final)
            if item is None:
                self._hint = max(self._pos, len(self._buf) - len(PARAM_END) + 1)
                return
            if item[0] == "bad":
                self._done = True  # an announced call cannot be taken back: its arguments stay cut
                return
            if item[0] == "end":
                fragment, self._done = ("}" if self._pairs else "{}"), True
            else:
                name = self.calls[-1]["function"]["name"]
                pair = json_pair(item[1], item[2], self._schemas.get(name))
                fragment = ("{" if not self._pairs else ", ") + pair
                self._pairs, self._pos, self._hint = self._pairs + 1, item[3], 0
            self.calls[-1]["function"]["arguments"] += fragment
            out.tool_calls.append({"index": len(self.calls) - 1, "function": {"arguments": fragment}})

    def _parse_whole(self, body: str, closed: bool) -> tuple[str, str] | None:
        return parse_block(body, self._schemas, closed)
