"""Qwen3-Coder XML tool calls (`--tool-call-parser qwen3_coder` / `auto`): whole-text parse with values
read by the tool schemas, streaming split at every position reassembling to it, history rendered
with the Coder template, and the server end to end through the openai client.

tests/data/qwen3_coder_chat_template.jinja is vLLM's examples/tool_chat_template_qwen3coder.jinja
(github.com/vllm-project/vllm, commit 7a3bde4c), the Qwen3-Coder template with its `<function=...>`
call format and `tool_call.arguments|items` loop.
"""

import itertools
import json
import os

import pytest

from qwen3next.api.chat_output import ChoiceParser
from qwen3next.chat_template import builtin_template, render_chat
from qwen3next.cli import build_parser
from qwen3next.parsers.qwen3_coder_tool_calls import (CoderToolCallStream, convert_value,
                                                      extract_coder_tool_calls)
from qwen3next.parsers.tool_parsers import forced_call_prefix, resolve_tool_parser

CODER_TEMPLATE_PATH = os.path.join(os.path.dirname(__file__), "data", "qwen3_coder_chat_template.jinja")
with open(CODER_TEMPLATE_PATH, encoding="utf-8") as f:
    CODER_TEMPLATE = f.read()

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "hot": {"type": "boolean"},
    "temp": {"type": "number"}, "opts": {"type": "object"}, "tags": {"type": "array"},
    "note": {"type": ["string", "null"]}, "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
    "required": ["city"]}}}  # fmt: skip
WRITE = {"type": "function", "function": {"name": "write_file", "parameters": {"type": "object", "properties": {
    "path": {"type": "string"}, "content": {"type": "string"}}}}}  # fmt: skip
TOOLS = [WEATHER, WRITE]


def _call(name, *params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


PARIS = _call("get_weather", ("city", "Paris"), ("days", "3"))
TYPED = _call("get_weather", ("city", "Saint-Étienne 🌦"), ("days", "-2"), ("hot", "True"), ("temp", "18.5"),
              ("opts", '{"units": ["°C"], "deep": {"a": [1, {"b": null}]}}'), ("tags", "['x', 'y']"),
              ("note", "null"), ("limit", "null"), ("extra", "7"))
CODE = _call("write_file", ("path", "a.py"), ("content", "\ndef f():\n    return '<b>' + \"x\"\n\n"))

TEXTS = [
    "I will check.\n\n" + PARIS,
    PARIS + "\n" + TYPED,
    "Before. " + CODE + "\nBetween.\n" + PARIS + "\n\nAfter all calls.  ",
    "Bad first: <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>\n" + PARIS,
    "No calls, a lone </tool_call> and <function=x> outside a block.",
    PARIS[: -len("\n</tool_call>")],  # unclosed, but the function is complete: a call
    _call("no_params"),
    _call("unknown_tool", ("n", "5")),
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n<parameter=days>\n4\n</function>\n</tool_call>",
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</tool_call>",  # closed: ends the function
    "",
]


def _ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def _args(call):
    return json.loads(call["function"]["arguments"])


def test_whole_parse_types_and_content():
    content, calls = extract_coder_tool_calls("Let me check both.\n\n" + PARIS + "\n" + TYPED, TOOLS)
    assert content == "Let me check both."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_weather"]
    assert calls[0]["function"]["arguments"] == '{"city": "Paris", "days": 3}'  # json.dumps spacing
    assert _args(calls[1]) == {"city": "Saint-Étienne 🌦", "days": -2, "hot": True, "temp": 18.5,
                               "opts": {"units": ["°C"], "deep": {"a": [1, {"b": None}]}},
                               "tags": ["x", "y"], "note": None, "limit": None, "extra": "7"}  # fmt: skip
    assert "°C" in calls[1]["function"]["arguments"]  # non-ASCII kept
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    # a string keeps everything but the one newline on each side; no tools: everything a string
    _, (code,) = extract_coder_tool_calls(CODE, TOOLS)
    assert _args(code)["content"] == "\ndef f():\n    return '<b>' + \"x\"\n\n"
    _, (untyped,) = extract_coder_tool_calls(PARIS)
    assert _args(untyped) == {"city": "Paris", "days": "3"}
    assert extract_coder_tool_calls(_call("no_params"))[1][0]["function"]["arguments"] == "{}"


def test_convert_value_follows_the_schema():
    assert convert_value("3", {"type": "string"}) == "3"
    assert convert_value("null", {"type": "string"}) == "null"  # a string-typed value is never None
    assert convert_value("3", {"type": "integer"}) == 3 and convert_value("3.5", {"type": "integer"}) == "3.5"
    assert convert_value("1e3", {"type": "number"}) == 1000.0 and convert_value("-0.5", {"type": "number"}) == -0.5
    assert convert_value("inf", {"type": "number"}) == "inf" and convert_value("nan", {"type": "float"}) == "nan"
    assert convert_value("FALSE", {"type": "boolean"}) is False and convert_value("yes", {"type": "bool"}) == "yes"
    assert convert_value("[1, 2]", {"type": "object"}) == "[1, 2]"  # not an object: kept as text
    assert convert_value("{'a': True}", {"type": "object"}) == {"a": True}  # a Python literal
    assert convert_value("{bad", {"type": "object"}) == "{bad"
    assert convert_value("7", {"type": ["string", "integer"]}) == 7  # non-string types first
    assert convert_value("7", None) == "7" and convert_value("7", {}) == "7"
    assert convert_value("[" * 5000, {"type": "array"}) == "[" * 5000  # too deep: text, no error


def test_malformed_blocks_stay_content():
    for bad in ["<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n",  # cut
                "<tool_call>\n<function=get_weather>\n<parameter=city\nParis\n</function>\n</tool_call>",
                "<tool_call>\n<function=>\n</function>\n</tool_call>",
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>",
                "<tool_call>"]:  # fmt: skip
        assert extract_coder_tool_calls("Text " + bad, TOOLS) == ("Text " + bad, [])
    content, calls = extract_coder_tool_calls("A " + PARIS + " B <tool_call>\n<function=x>\n<para", TOOLS)
    assert content == "A\nB <tool_call>\n<function=x>\n<para" and len(calls) == 1
    # a missing </parameter> ends the value at the next parameter or at </function>, as vLLM reads it
    _, (call,) = extract_coder_tool_calls(TEXTS[8], TOOLS)
    assert _args(call) == {"city": "Rome", "days": 4}
    # ... and a closed block ends both (only a block cut by max_tokens stays text)
    _, (call,) = extract_coder_tool_calls(TEXTS[9], TOOLS)
    assert _args(call) == {"city": "Oslo"}


def _splits(text):
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]


def _run_stream(deltas, stream_arguments=True):
    """Reassemble a stream as an OpenAI client does; check the delta protocol on the way."""
    s = CoderToolCallStream(TOOLS, _ids(), stream_arguments=stream_arguments)
    content, calls = "", []
    for out in [s.feed(d) for d in deltas] + [s.finish()]:
        content += out.content
        for d in out.tool_calls:
            if "id" in d:  # a new call: index, id, type and name exactly once, before its arguments
                assert d["index"] == len(calls) and d["type"] == "function" and d["function"]["name"]
                calls.append({"id": d["id"], "type": "function",
                              "function": {"name": d["function"]["name"], "arguments": ""}})  # fmt: skip
            else:
                assert d["index"] == len(calls) - 1 and set(d["function"]) == {"arguments"}
            calls[-1]["function"]["arguments"] += d["function"].get("arguments", "")
    assert calls == s.calls
    return content or None, calls


@pytest.mark.parametrize("stream_arguments", [True, False])
def test_stream_equals_whole_at_every_split(stream_arguments):
    for text in TEXTS:
        want = extract_coder_tool_calls(text, TOOLS, _ids())
        for deltas in _splits(text):
            assert _run_stream(deltas, stream_arguments) == want, (text, deltas)


def test_stream_sends_each_parameter_as_a_fragment_and_a_cut_call_finishes_length():
    s = CoderToolCallStream(TOOLS, _ids())
    frags = [d["function"].get("arguments") for ch in PARIS for d in s.feed(ch).tool_calls]
    assert frags == [None, '{"city": "Paris"', ', "days": 3', "}"]
    # cut by max_tokens inside the call: the stream had announced it, the whole parse keeps it as text
    cut = "Checking.\n" + PARIS[: PARIS.index("3")]
    for stream in (True, False):
        p = ChoiceParser(reasoning=False, tools=True, tool_parser="qwen3_coder", tool_defs=TOOLS)
        if stream:
            deltas = [p.feed(cut), p.flush()]
            args = "".join(t.function.arguments or "" for d in deltas if d for t in d.tool_calls or [])
            assert args == '{"city": "Paris"' and p.stream_finish_reason("length") == "length"
        else:
            message, called = p.final(cut)
            assert not called and message.content == cut
    p = ChoiceParser(reasoning=False, tools=True, tool_parser="qwen3_coder", tool_defs=TOOLS)
    p.feed(PARIS)
    p.flush()
    assert p.stream_finish_reason("stop") == "tool_calls"


def test_history_renders_with_both_templates():
    """OpenAI clients send arguments as a JSON string: the Coder template iterates them as a mapping,
    the Thinking template prints them; the Coder rendering parses back to the same arguments."""
    args = {"city": "Paris", "days": 3, "opts": {"units": ["°C"]}}
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args)}}
    msgs = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Checking.", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    text = render_chat(CODER_TEMPLATE, msgs, tools=TOOLS)
    assert "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n" in text
    assert "<parameter=opts>\n{\"units\": [\"°C\"]}\n</parameter>" in text
    assert text.endswith("<tool_response>\n18C\n</tool_response>\n<|im_end|>\n<|im_start|>assistant\n")
    turn = text[text.index("<|im_start|>assistant") :]  # (the system prompt shows an example call)
    block = turn[turn.index("<tool_call>") : turn.index("</tool_call>") + len("</tool_call>")]
    assert _args(extract_coder_tool_calls(block, TOOLS)[1][0]) == args
    thinking = render_chat(builtin_template(), msgs, tools=TOOLS)
    as_dict = [msgs[0], {**msgs[1], "tool_calls": [{**call, "function": {"name": "get_weather", "arguments": args}}]},
               msgs[2]]
    assert thinking == render_chat(builtin_template(), as_dict, tools=TOOLS)
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3' in thinking
    assert call["function"]["arguments"] == json.dumps(args)  # the caller's message is untouched


class _Tok:
    def __init__(self, template):
        self.template = template

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=True):
        return render_chat(self.template, messages, tools=tools, add_generation_prompt=add_generation_prompt)


def test_auto_picks_the_parser_from_the_template_and_cli_choices():
    assert resolve_tool_parser("auto", _Tok(CODER_TEMPLATE)) == "qwen3_coder"
    assert resolve_tool_parser("auto", _Tok(builtin_template())) == "hermes"
    assert resolve_tool_parser("auto", _Tok(builtin_template("qwen3_next_instruct"))) == "hermes"
    assert resolve_tool_parser("auto", _Tok("{{ raise_exception('no') }}")) == "hermes"
    assert resolve_tool_parser("none", None) is None and resolve_tool_parser("hermes", None) == "hermes"
    with pytest.raises(ValueError, match="--tool-call-parser"):
        resolve_tool_parser("mistral", None)
    parser = build_parser()
    assert parser.parse_args(["serve"]).tool_call_parser == "auto"
    assert parser.parse_args(["serve", "--tool-call-parser", "qwen3_coder"]).tool_call_parser == "qwen3_coder"
    assert forced_call_prefix("qwen3_coder", "f", True) == "<tool_call>\n<function=f>\n"
    assert forced_call_prefix("hermes", None, True) == '<tool_call>\n{"name": "'


# ---- the server, end to end ----
openai = pytest.importorskip("openai")
USER = [{"role": "user", "content": "Weather in Paris?"}]


def coder_server(tiny_ckpt):
    """The tiny checkpoint served with the Coder template (tool parser `auto` -> qwen3_coder)."""
    from tests.helpers.server_harness import ServerHarness

    # the Coder template's tool prompt is ~1300 tiny-vocab tokens: room beyond the tiny model's 512
    return ServerHarness(tiny_ckpt, "--served-model-name", "tiny", "--max-num-seqs", "2",
                         "--chat-template", CODER_TEMPLATE_PATH, "--hf-overrides", '{"max_position_embeddings": 4096}')


@pytest.fixture(scope="module")
def srv(tiny_ckpt):
    h = coder_server(tiny_ckpt)
    yield h
    h.close()


def test_server_parses_coder_calls(srv, client):
    assert srv.state.tool_parser == "qwen3_coder"  # auto, from the template
    pieces = ("Let me check.\n\n", "<tool_call>", "\n<function=get_weather>\n<parameter=city>\nPa", "ris\n",
              "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n", "</tool_call>")
    srv.push(*pieces)
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=80)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Let me check."
    (call,) = c.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    assert "<function>\n<name>get_weather</name>" in srv.tok.decode(srv.sampler.seen_prompts[-1])
    srv.push(*pieces)
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=80,
                                                 stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "Let me check."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # cut inside the call: content and "length" whole, "length" streamed
    cut = len(srv.ids(*pieces[:3]))
    for stream in (False, True):
        srv.push(*pieces)
        r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=cut, stream=stream)
        last = r.choices[0] if not stream else [ch for ch in r if ch.choices][-1].choices[0]
        assert last.finish_reason == "length"


def test_server_history_and_named_tool_choice(srv, client):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}
    history = USER + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    srv.push("It is 18C.")
    r = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=20)
    assert r.choices[0].message.content == "It is 18C."
    prompt = srv.tok.decode(srv.sampler.seen_prompts[-1])
    assert "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n" in prompt
    # arguments that are no JSON object cannot be iterated by the template: a 400, not a 500
    bad = [history[0], {**history[1], "tool_calls": [{**call, "function": {"name": "get_weather", "arguments": "x"}}]}]
    with pytest.raises(openai.BadRequestError, match="chat template failed to render"):
        client.chat.completions.create(model="tiny", messages=bad, tools=TOOLS, max_tokens=5)
    # a named tool_choice prefills the Coder header; the model writes only the parameters
    srv.push("<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>")
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=40,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert srv.tok.decode(srv.sampler.seen_prompts[-1]).endswith("<tool_call>\n<function=get_weather>\n")
    (got,) = r.choices[0].message.tool_calls
    assert got.function.name == "get_weather" and json.loads(got.function.arguments) == {"city": "Rome"}
    # "required": the prefill opens the call, the model names the function
    srv.push("write_file>\n<parameter=path>\na.py\n</parameter>\n</function>\n</tool_call>")
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=80,
                                       tool_choice="required")
    assert srv.tok.decode(srv.sampler.seen_prompts[-1]).endswith("assistant\n<tool_call>\n<function=")
    (got,) = r.choices[0].message.tool_calls
    assert got.function.name == "write_file" and json.loads(got.function.arguments) == {"path": "a.py"}
    assert r.choices[0].finish_reason == "tool_calls"


def test_token_stream_through_the_real_tokenizer():
    """Qwen's vocabulary (qwen-agent's qwen.tiktoken): ids -> detokenizer -> stream == whole parse."""
    from qwen3next.detokenizer import IncrementalDetokenizer
    from qwen3next.tokenizer import get_tokenizer
    from tests.helpers.qwen_vocab import qwen_tokenizer_dir

    path = qwen_tokenizer_dir()
    if path is None:
        pytest.skip("qwen-agent (qwen.tiktoken) not installed")
    tok = get_tokenizer(path)
    ids = tok.encode("Writing 巴黎 🌦 first.\n\n" + CODE + "\n" + TYPED)
    detok = IncrementalDetokenizer(tok)
    assert _run_stream([detok.add(i) for i in ids] + [detok.flush()]) == extract_coder_tool_calls(
        tok.decode(ids), TOOLS, _ids())


def test_forced_call_grammar_accepts_the_format_and_the_schemas():
    llg = pytest.importorskip("llguidance")
    from qwen3next.parsers.qwen3_coder_grammar import coder_call_grammar
    from qwen3next.tokenizer import get_tokenizer
    from tests.helpers.qwen_vocab import qwen_tokenizer_dir

    path = qwen_tokenizer_dir()
    if path is None:
        pytest.skip("qwen-agent (qwen.tiktoken) not installed")
    tok = get_tokenizer(path)
    with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
        lt = llg.LLTokenizer(f.read())

    def accepts(rest, name=None):
        m = llg.LLMatcher(lt, llg.grammar_from("lark", coder_call_grammar(TOOLS, name, tok.token_to_id("</tool_call>"))),
                          log_level=0)
        return all(m.consume_token(t) for t in tok.encode(rest)) and m.is_accepting()

    typed = _call("get_weather", ("city", "Saint-Étienne 🌦"), ("days", "-2"), ("hot", "true"), ("temp", "18.5"),
                  ("opts", '{"units": ["°C"]}'), ("tags", '["x", 1]'), ("note", "null"), ("limit", "null"))
    for rest in (PARIS, typed, CODE, _call("write_file")):
        rest = rest[len("<tool_call>\n<function=") :]  # after the prefill
        assert accepts(rest), rest
        assert extract_coder_tool_calls("<tool_call>\n<function=" + rest, TOOLS)[1]
    assert accepts("<parameter=path>\na\n</parameter>\n</function>\n</tool_call>", "write_file")
    for rest in ("get_weather>\n</function>\n</tool_call>",  # city is required
                 "get_weather>\n<parameter=days>\n3\n</parameter>\n<parameter=city>\nP\n</parameter>\n</function>\n",
                 "get_weather>\n<parameter=city>\nP\n</parameter>\n<parameter=days>\nx\n</parameter>\n",
                 "get_weather>\n<parameter=city>\nP</function>\n</parameter>\n",  # a tag inside a string
                 "unknown>\n</function>\n</tool_call>"):
        assert not accepts(rest), rest
    with pytest.raises(ValueError, match="no tool named"):
        coder_call_grammar(TOOLS, "nope", None)


def test_server_forced_calls_follow_the_schemas(srv, client):
    pytest.importorskip("llguidance")
    # no script: the random tiny model samples under the forced call's grammar
    trip = {"type": "function", "function": {"name": "trip", "parameters": {"type": "object", "properties": {
        "to": {"enum": ["Rome", "Oslo"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["to"]}}}
    for choice in ({"type": "function", "function": {"name": "trip"}}, "required"):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go"}], tools=[trip],
                                           max_tokens=75, seed=1, temperature=1.0, tool_choice=choice)
        assert r.choices[0].message.tool_calls, (choice, r.choices[0].message.content)
        (call,) = r.choices[0].message.tool_calls
        args = json.loads(call.function.arguments)
        assert call.function.name == "trip" and r.choices[0].finish_reason == "tool_calls"
        assert args["to"] in ("Rome", "Oslo") and set(args) <= {"to", "n"} and 0 <= args.get("n", 0) <= 9
