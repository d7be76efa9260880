"""Output parsers: reasoning (`</think>` split) and tool calls (hermes JSON or Qwen3-Coder XML, picked
in tool_parsers), whole-text and streaming."""

from qwen3next.parsers.reasoning import ReasoningParser, ReasoningStream
from qwen3next.parsers.tool_calls import ToolCallStream, ToolDelta, extract_tool_calls
from qwen3next.parsers.tool_parsers import extract_calls, resolve_tool_parser, tool_call_stream

__all__ = ["ReasoningParser", "ReasoningStream", "ToolCallStream", "ToolDelta", "extract_calls", "extract_tool_calls",
           "resolve_tool_parser", "tool_call_stream"]
