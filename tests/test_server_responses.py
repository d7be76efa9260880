"""POST /v1/responses through the official openai client (`client.responses.create`, plain and
stream=True), on the tiny checkpoint with the harness's scripted sampler: output items (reasoning,
message, function_call), usage, a tool-call round trip, json_schema text format, max_output_tokens
-> incomplete, and the 400s (previous_response_id, bad input types)."""

import json

import pytest

openai = pytest.importorskip("openai")
from openai.types.responses import Response  # noqa: E402

from tests.helpers.server_harness import ServerHarness  # noqa: E402

WEATHER = {"type": "function", "name": "get_weather", "description": "Get weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = ("Need weather.\n", "</think>", "\n\n", "<tool_call>",
        '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n', "</tool_call>")


@pytest.fixture(scope="module")
def srv(tiny_ckpt):
    h = ServerHarness(tiny_ckpt, "--served-model-name", "tiny", "--max-num-seqs", "4")
    yield h
    h.close()


def _check_schema(r):
    """The body validates against openai's own Response model (not just the lenient construct)."""
    body = r.model_dump(exclude_unset=True)
    # a field newer openai types require that vLLM does not send either: the server has no such count
    body["usage"]["input_tokens_details"].setdefault("cache_write_tokens", 0)
    Response.model_validate(body)


def test_plain_prompt_items_and_usage(srv, client):
    srv.push("Let me think.\n", "</think>", "\n\nParis is nice.")
    r = client.responses.create(model="tiny", input="Weather in Paris?", instructions="Be brief.",
                                max_output_tokens=40, metadata={"k": "v"}, store=False, user="u1",
                                reasoning={"effort": "low"})
    _check_schema(r)
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.metadata == {"k": "v"} and r.model == "tiny" and r.instructions == "Be brief."
    reasoning, message = r.output
    assert reasoning.type == "reasoning" and reasoning.summary == []
    assert reasoning.content[0].type == "reasoning_text" and reasoning.content[0].text == "Let me think.\n"
    assert message.type == "message" and message.role == "assistant"
    assert r.output_text == "\n\nParis is nice."
    assert r.usage.output_tokens == len(srv.ids("Let me think.\n</think>\n\nParis is nice.")) + 1  # + EOS
    assert r.usage.output_tokens_details.reasoning_tokens == len(srv.ids("Let me think.\n"))
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens == 0
    prompt = srv.tok.decode(srv.sampler.seen_prompts[-1])
    assert "Be brief." in prompt and "Weather in Paris?" in prompt


def test_same_seed_same_text_as_chat_and_stream(srv, client):
    kw = dict(model="tiny", temperature=1.0, extra_body={"seed": 11})
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=12, **kw)
    r = client.responses.create(input="Hi", max_output_tokens=12, **kw)
    m = chat.choices[0].message
    assert [o.type for o in r.output if o.type == "reasoning"] == (["reasoning"] if m.reasoning_content else [])
    got = next((o.content[0].text for o in r.output if o.type == "reasoning"), None)
    assert got == m.reasoning_content and (r.output_text or None) == m.content
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    events = list(client.responses.create(input="Hi", max_output_tokens=12, stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert [o.model_dump() for o in final.output] != [] and final.usage.output_tokens == r.usage.output_tokens
    assert [o.content[0].text for o in final.output] == [o.content[0].text for o in r.output]


def test_stream_event_order(srv, client):
    srv.push("Hmm.\n", "</think>", "\n\nThe ", "answer.")
    events = list(client.responses.create(model="tiny", input="Q?", max_output_tokens=40, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert types[2:5] == ["response.output_item.added", "response.content_part.added",
                          "response.reasoning_text.delta"]
    i = types.index("response.reasoning_text.done")
    assert types[i:i + 5] == ["response.reasoning_text.done", "response.content_part.done",
                              "response.output_item.done", "response.output_item.added",
                              "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert text == "\n\nThe answer." and reasoning == "Hmm.\n"
    final = events[-1].response
    _check_schema(final)
    assert final.output_text == text and final.output[0].content[0].text == reasoning
    assert final.usage.output_tokens_details.reasoning_tokens == len(srv.ids("Hmm.\n"))
    # the stream helper accumulates the same events into the final response
    srv.push("Hmm.\n", "</think>", "\n\nThe ", "answer.")
    with client.responses.stream(model="tiny", input="Q?", max_output_tokens=40) as s:
        assert s.get_final_response().output_text == text


def test_tool_call_round_trip(srv, client):
    srv.push(*CALL)
    r = client.responses.create(model="tiny", input="Weather in Paris?", tools=[WEATHER], max_output_tokens=80)
    _check_schema(r)
    calls = [o for o in r.output if o.type == "function_call"]
    (call,) = calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"} and call.call_id
    assert r.output[0].type == "reasoning" and r.status == "completed"
    assert "get_weather" in srv.tok.decode(srv.sampler.seen_prompts[-1])  # flat tools reached the template
    # the next turn: the call and its output go back as input items
    srv.push("Got it.\n", "</think>", "\n\nIt is 18 C.")
    follow = [{"role": "user", "content": "Weather in Paris?"}, r.output[0].model_dump(), call.model_dump(),
              {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 18}'}]
    r2 = client.responses.create(model="tiny", input=follow, tools=[WEATHER], max_output_tokens=30)
    assert r2.output_text == "\n\nIt is 18 C."
    prompt = srv.tok.decode(srv.sampler.seen_prompts[-1])
    assert '"city": "Paris"' in prompt and "<tool_response>" in prompt and '{"temp": 18}' in prompt
    # streamed, two calls: one function_call item each, with its argument events
    srv.push(*CALL, "\n", "<tool_call>", '\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n',
             "</tool_call>")
    events = list(client.responses.create(model="tiny", input="Weather?", tools=[WEATHER],
                                          max_output_tokens=120, stream=True))
    for index, city in ((1, "Paris"), (2, "Rome")):
        args = "".join(e.delta for e in events
                       if e.type == "response.function_call_arguments.delta" and e.output_index == index)
        (done,) = [e for e in events if e.type == "response.function_call_arguments.done" and e.output_index == index]
        assert json.loads(args) == {"city": city} and done.arguments == args
    final = events[-1].response
    assert [o.type for o in final.output] == ["reasoning", "function_call", "function_call"]
    assert [json.loads(o.arguments)["city"] for o in final.output[1:]] == ["Paris", "Rome"]


def test_named_tool_choice(srv, client):
    srv.push("Use it.\n", "</think>")
    srv.push('get_weather", "arguments": {"city": "Rome"}}\n', "</tool_call>")
    r = client.responses.create(model="tiny", input="Weather?", tools=[WEATHER], max_output_tokens=60,
                                tool_choice={"type": "function", "name": "get_weather"})
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert json.loads(call.arguments) == {"city": "Rome"} and r.tool_choice.name == "get_weather"


def test_json_schema_format(srv, client):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    srv.push("</think>", '{"a": 5}')
    fmt = {"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}}
    r = client.responses.create(model="tiny", input="Give a.", text=fmt, max_output_tokens=40)
    assert json.loads(r.output_text) == {"a": 5} and r.text.format.type == "json_schema"
    with pytest.raises(openai.BadRequestError, match="schema") as e:
        client.responses.create(model="tiny", input="x", max_output_tokens=5,
                                text={"format": {"type": "json_schema", "name": "t", "schema": 3}})
    assert e.value.body["param"] == "text.format.schema"


def test_max_output_tokens_incomplete(srv, client):
    srv.push("still thinking about it")
    r = client.responses.create(model="tiny", input="Q?", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].type == "reasoning"
    srv.push("still thinking about it")
    events = list(client.responses.create(model="tiny", input="Q?", max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": 5}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": [{"type": "web_search_call"}]}, "input[0].type"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "temperature": "hot"}, "temperature"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"input": []}, "input"),
    ({"input": "x", "max_output_tokens": 10**6}, "max_output_tokens"),
])
def test_bad_input_is_400(srv, client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/responses", body={"model": "tiny", **body}, cast_to=object)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    if param == "previous_response_id":
        assert "not supported" in e.value.body["message"]
