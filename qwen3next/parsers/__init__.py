"""Output parsers: reasoning (`</think>` split) and hermes tool calls, whole-text and streaming."""

from qwen3next.parsers.reasoning import ReasoningParser, ReasoningStream
from qwen3next.parsers.tool_calls import ToolCallStream, ToolDelta, extract_tool_calls

__all__ = ["ReasoningParser", "ReasoningStream", "ToolCallStream", "ToolDelta", "extract_tool_calls"]
