"""Audit (session 6b): tool calls cut before they are complete, streamed.

A stop string or EOS inside a call leaves it incomplete: the whole-text parse keeps it as content
with finish_reason "stop", but the stream had announced it and then said "tool_calls" with
arguments that are no JSON (an openai client / Qwen-Agent would run a call with arguments "").
"""

import json

import pytest

from qwen3next.api.chat_output import ChoiceParser
from tests.test_qwen3_coder_tools import PARIS, TOOLS, coder_server

openai = pytest.importorskip("openai")
HERMES = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("parser,call", [("qwen3_coder", PARIS), ("hermes", HERMES)])
def test_a_call_cut_by_stop_or_eos_does_not_finish_tool_calls(parser, call):
    cut = "Checking.\n" + call[: call.index("Paris") + 2]
    for engine_reason in ("stop", "length"):
        p = ChoiceParser(reasoning=False, tools=True, tool_parser=parser, tool_defs=TOOLS)
        p.feed(cut)
        p.flush()
        assert p.called  # the stream announced the call
        assert p.stream_finish_reason(engine_reason) == engine_reason
        message, called = ChoiceParser(reasoning=False, tools=True, tool_parser=parser, tool_defs=TOOLS).final(cut)
        assert not called and message.content == cut
    p = ChoiceParser(reasoning=False, tools=True, tool_parser=parser, tool_defs=TOOLS)
    p.feed(call)
    p.flush()
    assert p.stream_finish_reason("stop") == "tool_calls"


@pytest.fixture(scope="module")
def srv(tiny_ckpt):
    h = coder_server(tiny_ckpt)
    yield h
    h.close()


def test_server_stop_string_inside_a_coder_call(srv, client):
    user = [{"role": "user", "content": "Weather?"}]
    got = {}
    for stream in (False, True):
        srv.push(PARIS)
        r = client.chat.completions.create(model="tiny", messages=user, tools=TOOLS, max_tokens=200,
                                           stop=["Paris"], stream=stream)
        if stream:
            r = [ch for ch in r if ch.choices]
            got[stream] = r[-1].choices[0].finish_reason
        else:
            got[stream] = r.choices[0].finish_reason
            assert not r.choices[0].message.tool_calls
    assert got == {False: "stop", True: "stop"}
    # a complete call cut right after by a stop string is still a call, streamed or not
    for stream in (False, True):
        srv.push(PARIS, "\nMore.")
        r = client.chat.completions.create(model="tiny", messages=user, tools=TOOLS, max_tokens=200,
                                           stop=["More"], stream=stream)
        if stream:
            chunks = [ch for ch in r if ch.choices]
            args = "".join(tc.function.arguments or "" for ch in chunks for tc in ch.choices[0].delta.tool_calls or [])
            assert chunks[-1].choices[0].finish_reason == "tool_calls" and json.loads(args)["city"] == "Paris"
        else:
            assert r.choices[0].finish_reason == "tool_calls"


# pydantic's schema of a tool with nested models: the parameters keep them in $defs, a property
# points there with a local $ref (alone, under items, or in Optional's anyOf)
NESTED = {"type": "function", "function": {"name": "plan", "parameters": {
    "type": "object", "properties": {
        "stops": {"type": "array", "items": {"$ref": "#/$defs/Stop"}},
        "home": {"$ref": "#/$defs/Stop"},
        "maybe": {"anyOf": [{"$ref": "#/$defs/Stop"}, {"type": "null"}]},
        "days": {"$ref": "#/definitions/Days"}},
    "required": ["stops", "home"],
    "$defs": {"Stop": {"type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer"}},
                       "required": ["city"]}},
    "definitions": {"Days": {"type": "integer"}}}}}  # fmt: skip


def test_coder_values_follow_local_refs():
    from qwen3next.parsers.qwen3_coder_tool_calls import extract_coder_tool_calls

    call = ("<tool_call>\n<function=plan>\n<parameter=stops>\n[{\"city\": \"Rome\"}]\n</parameter>\n"
            "<parameter=home>\n{\"city\": \"Oslo\", \"n\": 2}\n</parameter>\n<parameter=maybe>\n"
            "{\"city\": \"Bern\"}\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
    _, (got,) = extract_coder_tool_calls(call, [NESTED])
    assert json.loads(got["function"]["arguments"]) == {
        "stops": [{"city": "Rome"}], "home": {"city": "Oslo", "n": 2}, "maybe": {"city": "Bern"}, "days": 3}


def test_coder_forced_call_grammar_resolves_local_refs():
    llg = pytest.importorskip("llguidance")
    from qwen3next.parsers.qwen3_coder_grammar import (
        coder_call_grammar,
        coder_forced_call,
    )
    from qwen3next.tokenizer import get_tokenizer
    from tests.helpers.qwen_vocab import qwen_tokenizer_dir

    assert coder_forced_call([NESTED], None, None) is not None  # was a 400: Pointer '/$defs/Stop' does not exist
    path = qwen_tokenizer_dir()
    if path is None:
        pytest.skip("qwen-agent (qwen.tiktoken) not installed")
    tok = get_tokenizer(path)
    with open(f"{path}/tokenizer.json", encoding="utf-8") as f:
        lt = llg.LLTokenizer(f.read())

    def accepts(rest):
        m = llg.LLMatcher(lt, llg.grammar_from("lark", coder_call_grammar([NESTED], "plan", tok.token_to_id("</tool_call>"))), log_level=0)
        return all(m.consume_token(t) for t in tok.encode(rest)) and m.is_accepting()

    head = '<parameter=stops>\n[{"city": "Rome"}]\n</parameter>\n'
    assert accepts(head + '<parameter=home>\n{"city": "Oslo", "n": 2}\n</parameter>\n</function>\n</tool_call>')
    assert accepts(head + '<parameter=home>\n{"city": "Oslo"}\n</parameter>\n<parameter=days>\n3\n</parameter>\n'
                   "</function>\n</tool_call>")
    assert not accepts(head + "<parameter=home>\nOslo\n</parameter>\n</function>\n</tool_call>")  # an object
    assert not accepts(head + '<parameter=home>\n{"n": 2}\n</parameter>\n</function>\n</tool_call>')  # city
    assert not accepts(head + '<parameter=home>\n{"city": "O"}\n</parameter>\n<parameter=days>\nx\n'
                       "</parameter>\n</function>\n</tool_call>")  # fmt: skip


def test_responses_stream_marks_a_cut_call_incomplete(srv, client):
    """/v1/responses streamed: a function_call item whose call EOS cut (arguments no JSON) was
    'completed' with arguments '' (a client would run it); now 'incomplete'. A whole call: 'completed'."""
    import httpx

    rt = [{"type": "function", **t["function"]} for t in TOOLS]
    for script, status in ((PARIS[: PARIS.index("Paris") + 2], "incomplete"), (PARIS, "completed")):
        srv.push("Ok.\n", script)
        r = httpx.post(srv.url + "/v1/responses", timeout=60, json={
            "model": "tiny", "input": "Weather?", "tools": rt, "max_output_tokens": 200, "stream": True})
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        (call,) = [e["item"] for e in events if e["type"] == "response.output_item.done"
                   and e["item"]["type"] == "function_call"]
        assert call["status"] == status, call
        assert events[-1]["response"]["output"][-1]["status"] == status


def test_history_call_with_empty_arguments(srv, client):
    """vLLM reads a history call's empty (or null) arguments as {} (a no-parameter function); the
    Coder template cannot iterate a string: it was a 400 'Can only get item pairs from a mapping'."""
    for args in ("", None, "null", " "):
        fn = {"name": "get_weather", **({"arguments": args} if args is not None else {})}
        history = [{"role": "user", "content": "W?"},
                   {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": fn}]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
        srv.push("ok")
        r = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=5)
        assert r.choices[0].message.content == "ok"
        assert "<function=get_weather>\n</function>" in srv.tok.decode(srv.sampler.seen_prompts[-1])
