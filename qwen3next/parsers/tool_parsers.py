"""Which tool-call format the server reads: `hermes` (JSON in `<tool_call>`) or `qwen3_coder` (XML).

`resolve_tool_parser("auto", tokenizer)` picks qwen3_coder when the chat template renders an assistant
tool call as `<function=NAME>` (the Qwen3-Coder template), hermes otherwise (the Qwen3-Next Thinking /
Instruct templates). `tool_call_stream` / `extract_calls` hand out the chosen parser, and
`forced_call_prefix` is the start of a call in its format (the prefill of tool_choice required / named).
"""

from __future__ import annotations

from qwen3next.parsers.qwen3_coder_tool_calls import (
    CoderToolCallStream,
    extract_coder_tool_calls,
)
from qwen3next.parsers.tool_calls import ToolCallStream, extract_tool_calls

TOOL_CALL_PARSERS = ("hermes", "qwen3_coder")
CLI_CHOICES = ("auto", *TOOL_CALL_PARSERS, "none")
_PROBE = "qwen3next_probe"


def renders_coder_calls(tokenizer) -> bool:
    """Does the tokenizer's chat template write an assistant tool call as `<function=NAME>`?"""
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_0", "type": "function", "function": {"name": _PROBE, "arguments": {"a": "b"}}}]}]
    tools = [{"type": "function", "function": {
        "name": _PROBE, "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}}]
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that cannot render the probe shows no Coder format
        return False
    return f"<function={_PROBE}>" in text


def resolve_tool_parser(name: str, tokenizer) -> str | None:
    """The parser `--tool-call-parser NAME` means for this tokenizer's template (None: tools off)."""
    if name == "none":
        return None
    if name == "auto":
        return "qwen3_coder" if renders_coder_calls(tokenizer) else "hermes"
    if name not in TOOL_CALL_PARSERS:
        raise ValueError(f"--tool-call-parser: unknown parser {name!r}; choose from {', '.join(CLI_CHOICES)}")
    return name


def tool_call_stream(parser: str, tools=None) -> ToolCallStream:
    return CoderToolCallStream(tools) if parser == "qwen3_coder" else ToolCallStream()


def extract_calls(parser: str, text: str, tools=None) -> tuple[str | None, list[dict]]:
    """Whole-text parse with `parser`: (content or None, [call, ...])."""
    return extract_coder_tool_calls(text, tools) if parser == "qwen3_coder" else extract_tool_calls(text)


def forced_call_prefix(parser: str, name: str | None, grammar: bool) -> str:
    """The start of a call the model must complete: any tool's (name None) or `name`'s. For hermes
    with a grammar the name is left to the model (the grammar names it: a prefill ending in `": `
    splits tokens unnaturally); a named qwen3_coder call is prefilled up to its first parameter."""
    if parser == "qwen3_coder":
        return "<tool_call>\n<function=" + (f"{name}>\n" if name is not None else "")
    call = '<tool_call>\n{"name": "'
    return call + (name + '", "arguments": ' if name is not None and not grammar else "")
