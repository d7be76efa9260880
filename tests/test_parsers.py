"""Reasoning and tool-call parsers: whole-text results, and streaming deltas (split at every position,
char by char, at random, and token by token through the real tokenizer) reassembling to them."""

import itertools
import json
import random

import pytest

from qwen3next.detokenizer import IncrementalDetokenizer
from qwen3next.parsers import ReasoningParser, ToolCallStream, extract_tool_calls
from qwen3next.tokenizer import get_tokenizer
from tests.helpers.qwen_vocab import qwen_tokenizer_dir


def _call_text(name, args, raw=None):
    body = raw if raw is not None else json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


PARIS = _call_text("get_weather", {"city": "Paris"})
ROME = _call_text("get_weather", {"city": "Rome", "units": ["°C", "°F"], "deep": {"a": [1, {"b": None}]}})

REASONING_TEXTS = [
    "The user asks. </thin not a tag, a < b\n</think>\n\nThe answer.",
    "Reasoning only, cut by max_tokens </thi",
    "<think>\nopened anyway\n</think>\n\nx",
    "</think>",
    "</think>\n\nno reasoning",
    "R\n\n</think>\n\n",
    "two </think> tags </think> here",
    "<thin",
    "",
]
TOOL_TEXTS = [
    "\n\n" + PARIS,
    "I will check both.\n\n" + PARIS + "\n" + ROME,
    PARIS + "\nDone, between.\n" + ROME + "\n\nAfter all calls.  ",
    "Bad first: <tool_call>\n{not json}\n</tool_call>\n" + PARIS,
    "No calls here, just <b>text</b> and a lone </tool_call>.",
    "Cut: " + PARIS + "\n" + ROME[:40],
    "Cut after the header: " + PARIS + "\n" + ROME[: ROME.index("Rome") + 2],
    "Cut right after the tag: <tool_call>",
    PARIS[: -len("\n</tool_call>")],  # unclosed but complete JSON: a call, as vLLM accepts
    _call_text("", None, raw='{"arguments": {"x": 1}, "name": "reordered"}'),
    _call_text("", None, raw='{"name": "no_args"}'),
    _call_text("", None, raw='["not", "an", "object"]'),
    _call_text("", None, raw='{"name": "f", "arguments": {"s": "</tool_call> inside"}}'),
]


def _splits(text, rng, n_random=30):
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    for _ in range(n_random):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(1, 6))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


# ---- reasoning ----
def test_reasoning_whole():
    p = ReasoningParser()
    assert p.extract("R\n</think>\n\nA") == ("R\n", "\n\nA")
    assert ReasoningParser(strip_newlines=True).extract("R\n</think>\n\nA") == ("R", "A")
    assert p.extract("no end tag, truncated") == ("no end tag, truncated", None)
    assert p.extract("<think>\nR</think>A") == ("\nR", "A")
    assert p.extract("R</think>") == ("R", None)
    assert ReasoningParser(strip_newlines=True).extract("R</think>\n\n") == ("R", None)
    assert p.extract("a</think>b</think>c") == ("a", "b</think>c")
    assert p.extract("") == (None, None)


@pytest.mark.parametrize("strip", [False, True])
def test_reasoning_stream_equals_whole(strip):
    p, rng = ReasoningParser(strip_newlines=strip), random.Random(0)
    for text in REASONING_TEXTS:
        want = p.extract(text)
        for deltas in _splits(text, rng):
            s = p.stream()
            parts = [s.feed(d) for d in deltas] + [s.finish()]
            got = tuple("".join(x) or None for x in zip(*parts))
            assert got == want, (text, deltas)
            assert s.in_reasoning == ("</think>" not in text.removeprefix("<think>"))


def test_reasoning_stream_end_tag_delta_is_silent():
    s = ReasoningParser().stream()
    assert s.feed("thinking") == ("thinking", "")
    assert s.feed("</think>") == ("", "")
    assert not s.in_reasoning
    assert s.feed("\n\nanswer") == ("", "\n\nanswer")
    # a delta holding the tag plus text on both sides is split
    s = ReasoningParser().stream()
    assert s.feed("a</think>b") == ("a", "b")


# ---- tool calls ----
def _ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def test_tools_whole():
    content, calls = extract_tool_calls("I will check both.\n\n" + PARIS + "\n" + ROME)
    assert content == "I will check both."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_weather"]
    assert json.loads(calls[1]["function"]["arguments"])["units"] == ["°C", "°F"]
    assert calls[1]["function"]["arguments"].count("°") == 2  # ensure_ascii=False
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert calls[0]["id"] != calls[1]["id"]
    assert extract_tool_calls("\n\n" + PARIS)[0] is None
    # malformed JSON: that block stays as text, the good call is kept
    content, calls = extract_tool_calls("Bad: <tool_call>\n{not json}\n</tool_call>\n" + PARIS)
    assert content == "Bad: <tool_call>\n{not json}\n</tool_call>" and len(calls) == 1
    # a call cut by max_tokens is plain content
    cut = "Cut: " + ROME[:40]
    assert extract_tool_calls(cut) == (cut, [])
    content, calls = extract_tool_calls("Before. " + PARIS + " Between. " + PARIS + "\n\n<tool_call>\n{\"name\": ")
    assert content == "Before.\nBetween.\n<tool_call>\n{\"name\": " and len(calls) == 2
    assert extract_tool_calls("plain text ") == ("plain text ", [])
    assert extract_tool_calls("") == (None, [])
    _, calls = extract_tool_calls(_call_text("", None, raw='{"name": "no_args"}'))
    assert calls[0]["function"]["arguments"] == "{}"


# Announced calls cannot be taken back: with streamed arguments, a block whose header was fine but
# whose JSON then breaks (cut by max_tokens, a `</tool_call>` inside a string) stays a call.
ANNOUNCED_THEN_BROKEN = {
    TOOL_TEXTS[6]: ('{"city": "Ro', None),
    TOOL_TEXTS[-1]: ('{"s": "', 'inside"}}\n</tool_call>'),
}


@pytest.mark.parametrize("stream_arguments", [True, False])
def test_tools_stream_equals_whole(stream_arguments):
    rng = random.Random(1)
    for text in TOOL_TEXTS:
        want = extract_tool_calls(text, _ids())
        for deltas in _splits(text, rng):
            got = _run_tool_stream(deltas, stream_arguments)
            if stream_arguments and text in ANNOUNCED_THEN_BROKEN and got != want:
                # (when the break arrives in the same delta as the header, nothing was announced)
                args, content = ANNOUNCED_THEN_BROKEN[text]
                assert got[1][-1]["function"]["arguments"] == args, (text, deltas)
                assert got[0] == (content or want[0].partition("\n")[0]), (text, deltas)
                continue
            assert got == want, (text, deltas)


def _run_tool_stream(deltas, stream_arguments=True):
    """Reassemble a stream as an OpenAI client does; check the delta protocol on the way."""
    s = ToolCallStream(_ids(), stream_arguments=stream_arguments)
    content, calls = "", []
    for out in [s.feed(d) for d in deltas] + [s.finish()]:
        content += out.content
        for d in out.tool_calls:
            if "id" in d:  # a new call: index, id, type and name exactly once
                assert d["index"] == len(calls) and d["type"] == "function" and d["function"]["name"]
                calls.append({"id": d["id"], "type": "function",
                              "function": {"name": d["function"]["name"], "arguments": ""}})  # fmt: skip
            else:
                assert d["index"] == len(calls) - 1 and set(d["function"]) == {"arguments"}
            calls[-1]["function"]["arguments"] += d["function"].get("arguments", "")
    assert calls == s.calls
    return content or None, calls


def test_tools_stream_sends_arguments_in_fragments():
    s = ToolCallStream(_ids())
    text = "Checking.\n" + ROME
    outs = [s.feed(ch) for ch in text] + [s.finish()]
    deltas = [d for o in outs for d in o.tool_calls]
    assert deltas[0] == {"index": 0, "id": "call_0", "type": "function", "function": {"name": "get_weather"}}
    assert len(deltas) > 10  # arguments arrive char by char, not at the end
    # with whole-call mode, one delta per call
    s = ToolCallStream(_ids(), stream_arguments=False)
    outs = [s.feed(ch) for ch in text] + [s.finish()]
    assert [len(o.tool_calls) for o in outs if o.tool_calls] == [1]


# ---- token streams through the real tokenizer ----
@pytest.fixture(scope="module")
def qwen():
    path = qwen_tokenizer_dir()
    if path is None:
        pytest.skip("qwen-agent (qwen.tiktoken) not installed")
    return get_tokenizer(path)


@pytest.mark.parametrize(
    "output",
    [
        "The user wants the weather in 巴黎 🌦.\nI'll call the tool.\n</think>\n\n" + PARIS + "\n" + ROME + "<|im_end|>",
        "Short thought.\n</think>\n\nIt is 18°C in Paris 🌞.<|im_end|>",
        "A thought that mentions <tool_call> inside reasoning, then runs out of tok",
    ],
)
def test_token_stream_pipeline(qwen, output):
    """ids -> detokenizer -> reasoning stream -> tool stream equals the whole-text parse of decode(ids)."""
    ids = qwen.encode(output)
    detok, rs, ts = IncrementalDetokenizer(qwen), ReasoningParser().stream(), ToolCallStream(_ids())
    reasoning, content, calls = "", "", {}
    for text in [detok.add(i) for i in ids] + [detok.flush()]:
        assert "\ufffd" not in text
        r, c = rs.feed(text)
        reasoning += r
        out = ts.feed(c)
        content += out.content
        for d in out.tool_calls:
            calls.setdefault(d["index"], {"name": "", "arguments": ""})
            calls[d["index"]]["name"] += d["function"].get("name", "")
            calls[d["index"]]["arguments"] += d["function"].get("arguments", "")
    r, c = rs.finish()
    reasoning += r
    out = ts.feed(c)
    fin = ts.finish()
    content += out.content + fin.content
    assert not out.tool_calls and not fin.tool_calls
    want_reasoning, want_content = ReasoningParser().extract(qwen.decode(ids))
    want_content, want_calls = extract_tool_calls(want_content or "", _ids())
    assert (reasoning or None, content or None) == (want_reasoning, want_content)
    assert [calls[i] for i in sorted(calls)] == [c["function"] for c in want_calls]
    if "</think>" not in output:
        assert content == "" and not calls  # a <tool_call> inside reasoning is not parsed
