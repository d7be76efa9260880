"""Chat template rendering, the way transformers' `apply_chat_template` renders.

Owns: picking the template (a string, a list of named templates, a `chat_template.jinja` file or the
built-in Thinking template), the Jinja environment HF uses (sandboxed, trim/lstrip blocks,
loopcontrols, HF's `tojson`), message normalisation (None values dropped, text parts flattened with
"\\n", reasoning aliases, tool-call arguments sent as a JSON object string parsed to a dict) and
`continue_final_message`. Returns text; tokenizing is the caller's job.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from importlib import resources

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_NAMES = ("qwen3_next_thinking", "qwen3_next_instruct")
# Names a message's reasoning may arrive under (vLLM <=0.11, newer vLLM/OpenRouter, gpt-oss style)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# HF's marker for continue_final_message: appended to the final content, located after rendering
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def builtin_template(name: str = "qwen3_next_thinking") -> str:
    """The packaged template text, byte-exact (see chat_format.md §1)."""
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"chat_template: unknown built-in template {name!r}; have {TEMPLATE_NAMES}")
    return resources.files("qwen3next").joinpath(f"templates/{name}.jinja").read_text(encoding="utf-8")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson sorts keys and HTML-escapes; HF's (and the model's training data) does neither
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def select_template(templates: str | dict[str, str] | None, chat_template: str | None, tools) -> str:
    """HF `get_chat_template`: `chat_template` is a name in `templates` or a template string."""
    if isinstance(templates, dict):
        if chat_template is not None and chat_template in templates:
            return templates[chat_template]
        if chat_template is None:
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise ValueError(f"chat_template: several named templates {sorted(templates)} and no 'default'")
    if chat_template is not None:
        return chat_template
    return templates if templates is not None else builtin_template()


def flatten_content(content, where: str):
    """A string stays; a list of text parts becomes their texts joined by "\\n" (vLLM's string format)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(f"{where}.content[{j}]: only text parts are supported, got {kind!r}")
    return "\n".join(texts)


def _plain(value):
    # Fresh plain-JSON copy: the template never sees (or mutates) the caller's objects
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return value


def _arguments_as_dict(call):
    """OpenAI clients send a call's arguments as a JSON string; templates iterate them
    (Qwen3-Coder: `arguments|items`) or print them with tojson: parse a JSON object, as vLLM does.
    Any other string stays as it is (a template that prints strings shows it verbatim)."""
    if not isinstance(call, dict):
        return call
    nested = isinstance(call.get("function"), dict)
    fn = call["function"] if nested else call
    if not isinstance(fn.get("arguments"), str):
        return call
    try:
        parsed = json.loads(fn["arguments"])
    except (ValueError, RecursionError):
        return call
    if not isinstance(parsed, dict):
        return call
    fn = {**fn, "arguments": parsed}
    return {**call, "function": fn} if nested else fn


def normalize_messages(messages) -> list[dict]:
    """Copy messages as plain dicts: None values dropped, content flattened, reasoning aliased."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages: expected a list of messages, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        message = _plain(message)
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}]: expected a dict, got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}].role: missing or not a string")
        message = {k: v for k, v in message.items() if v is not None}
        if "content" in message:
            message["content"] = flatten_content(message["content"], f"messages[{i}]")
        if isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [_arguments_as_dict(tc) for tc in message["tool_calls"]]
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            # As HF: `thinking` too, for templates (gpt-oss) that read that name
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat(
    template: str,
    messages,
    tools=None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    documents=None,
    **kwargs,
) -> str:
    """Render `messages` with `template` as HF's `render_jinja_template` does (one conversation)."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
    chat = normalize_messages(messages)
    if tools is not None and not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools: expected a list, got {type(tools).__name__}")
    tools = _plain(tools)
    final = None
    if continue_final_message:
        if not chat or not isinstance(chat[-1].get("content"), str):
            raise ValueError("continue_final_message: the final message has no text content to continue")
        final = chat[-1]["content"]
        chat[-1]["content"] = final + _CONTINUE_TAG
    rendered = compile_template(template).render(
        messages=chat,
        tools=tools,
        documents=_plain(documents),
        add_generation_prompt=add_generation_prompt,
        **_plain(kwargs),
    )
    if final is not None:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in rendered or tag not in rendered:
            raise ValueError("continue_final_message: the template dropped part of the final message")
        loc = rendered.rindex(tag)
        # The template may have trimmed the tag's trailing space; then trim what precedes it too
        kept_space = rendered[loc : loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG
        rendered = rendered[:loc] if kept_space else rendered[:loc].rstrip()
    return rendered
