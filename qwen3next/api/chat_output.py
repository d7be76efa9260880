"""One chat choice's text -> reasoning / content / tool calls, whole or as stream deltas.

Wraps the project parsers (`qwen3next.parsers`): the reasoning split runs first, the tool parser
(hermes, or qwen3_coder reading values by the request's tool schemas) sees only the content after
`</think>` (openai_api.md §4.1). A forced-tool prefix (the prefill of tool_choice required/named) is
parsed as if the model had generated it. Also turns the engine's per-token logprob dicts into the
OpenAI `logprobs.content` entries, and prompt logprobs into vLLM's `prompt_logprobs` list.
"""

from __future__ import annotations

import json
import math

from qwen3next.api.protocol import (DeltaMessage, DeltaToolCall, FunctionCall, PromptLogprob,
                                    ResponseMessage, TokenLogprob, ToolCall, TopLogprob)
from qwen3next.parsers import ReasoningParser, ReasoningStream, extract_calls, tool_call_stream


class ChoiceParser:
    def __init__(self, reasoning: bool, tools: bool, prefix: str = "", parallel: bool = True,
                 strip_newlines: bool = False, tool_parser: str = "hermes", tool_defs=None):
        self.reasoning = reasoning
        self.tools = tools
        self.prefix = prefix
        self.parallel = parallel
        self.strip_newlines = strip_newlines
        self._rs = ReasoningStream(strip_newlines) if reasoning else None
        self.tool_parser = tool_parser
        self.tool_defs = tool_defs  # the request's tools (qwen3_coder reads values by their schemas)
        self._ts = tool_call_stream(tool_parser, tool_defs) if tools else None
        self._prefix_fed = False
        self.called = False  # a tool call was emitted (finish_reason "tool_calls")

    # ---- streaming ----
    def feed(self, text: str, include_reasoning: bool = True) -> DeltaMessage | None:
        if not self._prefix_fed:
            text, self._prefix_fed = self.prefix + text, True
        reasoning, content = self._rs.feed(text) if self._rs else ("", text)
        return self._delta(reasoning, content, include_reasoning, final=False)

    def stream_finish_reason(self, engine_reason: str | None) -> str | None:
        """"tool_calls" once a call was streamed, unless the output was cut inside that call (its
        arguments are no JSON: max_tokens, a stop string, EOS): then the engine's reason, as the
        whole-text parse says (the call stays content)."""
        if not self.called:
            return engine_reason
        last = self._ts.calls[-1 if self.parallel else 0]["function"]["arguments"]
        try:
            json.loads(last)
        except ValueError:
            return engine_reason
        return "tool_calls"

    def flush(self, include_reasoning: bool = True) -> DeltaMessage | None:
        """End of the choice: release held-back text and unsent tool-call fragments."""
        reasoning, content = self._rs.finish() if self._rs else ("", "")
        return self._delta(reasoning, content, include_reasoning, final=True)

    def _delta(self, reasoning: str, content: str, include_reasoning: bool, final: bool):
        calls: list[dict] = []
        if self._ts is not None:
            td = self._ts.feed(content) if content else None
            content, calls = (td.content, td.tool_calls) if td else ("", [])
            if final:
                tail = self._ts.finish()
                content, calls = content + tail.content, calls + tail.tool_calls
            if not self.parallel:
                calls = [c for c in calls if c["index"] == 0]
        calls = merge_call_deltas(calls)
        self.called = self.called or bool(calls)
        for c in calls:
            if "id" in c:
                # Qwen-Agent's raw-API mode builds FunctionCall(arguments=...) from the first delta
                # and rejects null: always send a string
                c["function"].setdefault("arguments", "")
        if not include_reasoning:
            reasoning = ""
        if not (reasoning or content or calls):
            return None
        return DeltaMessage(
            content=content or None, reasoning_content=reasoning or None, reasoning=reasoning or None,
            tool_calls=[DeltaToolCall.model_validate(c) for c in calls] or None)

    # ---- whole text ----
    def final(self, text: str, include_reasoning: bool = True) -> tuple[ResponseMessage, bool]:
        """(message, has tool calls) of the complete output text."""
        text = self.prefix + text
        if self.reasoning:
            reasoning, content = ReasoningParser(self.strip_newlines).extract(text)
        else:
            reasoning, content = None, text
        calls = []
        if self.tools and content:
            content, calls = extract_calls(self.tool_parser, content, self.tool_defs)
            if not self.parallel:
                calls = calls[:1]
        if not include_reasoning:
            reasoning = None
        message = ResponseMessage(
            content=content, reasoning_content=reasoning, reasoning=reasoning,
            tool_calls=[ToolCall(id=c["id"], function=FunctionCall(**c["function"])) for c in calls])
        return message, bool(calls)


def _clamp(lp: float) -> float:
    return max(lp, -9999.0) if not math.isnan(lp) else -9999.0


def token_logprobs(tok, token_ids: list[int], logprobs, top: int, as_ids: bool = False) -> list[TokenLogprob]:
    """Engine logprobs (one {id: Logprob} per token, the chosen id included) -> OpenAI entries;
    `as_ids` (the request's return_tokens_as_token_ids) names tokens "token_id:<id>", vLLM's form."""
    out = []
    table = tok.token_bytes
    for i, tid in enumerate(token_ids):
        entry = (logprobs or [])[i] if logprobs and i < len(logprobs) else {}

        def piece(t: int, lp: float) -> dict:
            raw = table[t] if 0 <= t < len(table) else b""
            name = f"token_id:{t}" if as_ids else tok.decode([t], skip_special_tokens=False)
            return {"token": name, "logprob": _clamp(lp),
                    "bytes": list(raw)}

        chosen = entry.get(tid)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)[:top] if top else []
        out.append(TokenLogprob(**piece(tid, chosen.logprob if chosen else -9999.0),
                                top_logprobs=[TopLogprob(**piece(t, lp.logprob)) for t, lp in ranked]))
    return out


def prompt_logprobs_json(tok, entries: list) -> list[dict[str, PromptLogprob] | None]:
    """Engine prompt logprobs (None, then one {id: Logprob} per prompt token) -> vLLM's JSON form:
    {"<id>": {"logprob", "rank", "decoded_token"}} per position (-inf clamped to -9999)."""
    names: dict[int, str] = {}

    def name(t: int) -> str:
        if t not in names:
            names[t] = tok.decode([t], skip_special_tokens=False)
        return names[t]

    return [None if d is None else
            {str(t): PromptLogprob(logprob=_clamp(lp.logprob), rank=lp.rank, decoded_token=name(t))
             for t, lp in d.items()} for d in entries]


def merge_call_deltas(calls: list[dict]) -> list[dict]:
    """One entry per call index, as OpenAI and vLLM send them: a call announced in the same delta
    as its first argument fragment (or two fragments) would otherwise be two entries with one index,
    and clients that read one entry per index (tool_calls[0]) lose the opening `{"`."""
    out: list[dict] = []
    for c in calls:
        if out and out[-1]["index"] == c["index"]:
            fn = out[-1].setdefault("function", {})
            fn["arguments"] = (fn.get("arguments") or "") + (c.get("function", {}).get("arguments") or "")
        else:
            out.append({**c, "function": dict(c.get("function", {}))})
    return out
