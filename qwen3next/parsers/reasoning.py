"""Split Qwen3 Thinking output into reasoning and content (vLLM `deepseek_r1` semantics).

The prompt ends inside `<think>\\n`, so the output is `REASONING</think>ANSWER`: text before the
first `</think>` is reasoning, text after it is content. A generated leading `<think>` is dropped;
no `</think>` at all (truncated or unclosed) means everything is reasoning (openai_api.md §4.1).
`strip_newlines=True` is the [rec] cleanup: content loses leading "\\n" (None if nothing is left),
reasoning loses trailing "\\n" when closed. Default off = byte-for-byte vLLM parity.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"


def partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (may grow into it)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    """Whole-text `extract` and a factory for per-request streaming state."""

    def __init__(self, strip_newlines: bool = False):
        self.strip_newlines = strip_newlines

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content); each None when empty."""
        if text.startswith(THINK_START):
            text = text[len(THINK_START) :]
        reasoning, sep, content = text.partition(THINK_END)
        if not sep:
            return text or None, None
        if self.strip_newlines:
            reasoning, content = reasoning.rstrip("\n"), content.lstrip("\n")
        return reasoning or None, content or None

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self.strip_newlines)


class ReasoningStream:
    """Feed text deltas; get (reasoning_delta, content_delta). A split `</think>` is held back."""

    def __init__(self, strip_newlines: bool = False):
        self.strip_newlines = strip_newlines
        self._phase = "start"  # start (a leading <think> may be forming) -> reasoning -> content
        self._buf = ""  # held back: a possible partial tag
        self._newlines = ""  # held back (strip_newlines): trailing "\n" of the reasoning so far
        self._content_started = False

    @property
    def in_reasoning(self) -> bool:
        """True until `</think>` has been seen."""
        return self._phase != "content"

    def feed(self, delta: str) -> tuple[str, str]:
        if self._phase == "content":
            return "", self._content(delta)
        self._buf += delta
        if self._phase == "start":
            if self._buf.startswith(THINK_START):
                self._buf = self._buf[len(THINK_START) :]
            elif THINK_START.startswith(self._buf):
                return "", ""
            self._phase = "reasoning"
        end = self._buf.find(THINK_END)
        if end >= 0:
            reasoning, rest = self._buf[:end], self._buf[end + len(THINK_END) :]
            self._buf = ""
            self._phase = "content"
            if self.strip_newlines:
                reasoning = (self._newlines + reasoning).rstrip("\n")
                self._newlines = ""
            return reasoning, self._content(rest)
        keep = partial_tag_len(self._buf, THINK_END)
        reasoning, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
        return self._reasoning(reasoning), ""

    def finish(self) -> tuple[str, str]:
        """End of output: release what was held back (no `</think>` came, so it is reasoning)."""
        if self._phase == "content":
            return "", ""
        out = self._newlines + self._buf
        self._newlines = self._buf = ""
        return out, ""

    def _reasoning(self, text: str) -> str:
        if not self.strip_newlines:
            return text
        text = self._newlines + text
        core = text.rstrip("\n")
        self._newlines = text[len(core) :]
        return core

    def _content(self, text: str) -> str:
        if self.strip_newlines and not self._content_started:
            text = text.lstrip("\n")
        if text:
            self._content_started = True
        return text
