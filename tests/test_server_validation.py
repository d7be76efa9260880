"""Request parsing and validation of the OpenAI layer (no engine, no HTTP)."""

import json

import pytest

pytest.importorskip("pydantic")

from qwen3next.api.errors import APIError  # noqa: E402
from qwen3next.api.protocol import ChatCompletionRequest, CompletionRequest  # noqa: E402
from qwen3next.api.validate import check_chat, check_completion, parse_body, template_messages  # noqa: E402

V = 1000


def chat(**kw):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    req = parse_body(json.dumps(body).encode(), ChatCompletionRequest)
    check_chat(req, V)
    return req


def bad(fn, param, **kw):
    with pytest.raises(APIError) as e:
        fn(**kw)
    assert e.value.status == 400
    assert e.value.param == param, e.value.message
    return e.value


def test_invalid_json_and_non_object():
    with pytest.raises(APIError) as e:
        parse_body(b"{not json", ChatCompletionRequest)
    assert e.value.status == 400 and "JSON" in e.value.message
    with pytest.raises(APIError):
        parse_body(b"[1, 2]", ChatCompletionRequest)


@pytest.mark.parametrize("field,value", [
    ("temperature", "hot"), ("temperature", True), ("n", 1.5), ("n", "2"), ("stream", "yes"),
    ("max_tokens", True), ("stop", 5), ("tools", "x"), ("seed", 0.5), ("top_k", 2.0),
])
def test_wrong_types_name_the_field(field, value):
    err = bad(chat, field, **{field: value})
    assert err.message.startswith(field)


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 10_000), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -5),
    ("min_p", 2.0), ("presence_penalty", 3.0), ("frequency_penalty", -2.5),
    ("repetition_penalty", 0.0), ("max_tokens", 0), ("max_completion_tokens", -1),
    ("min_tokens", -1), ("top_logprobs", 21), ("stop_token_ids", [V]), ("logit_bias", {"abc": 1}),
    ("logit_bias", {"5": 500}), ("stop", [""]),
])
def test_out_of_range(field, value):
    kw = {field: value}
    if field == "top_logprobs":
        kw["logprobs"] = True
    bad(chat, field, **kw)


def test_cross_field_rules():
    bad(chat, "top_logprobs", top_logprobs=2)
    bad(chat, "stream_options", stream_options={"include_usage": True})
    bad(chat, "tool_choice", tool_choice="required")
    tools = [{"type": "function", "function": {"name": "f"}}]
    bad(chat, "tool_choice", tools=tools, tool_choice={"type": "function", "function": {"name": "g"}})
    chat(tools=tools, tool_choice={"type": "function", "function": {"name": "f"}})
    bad(chat, "continue_final_message", continue_final_message=True)
    bad(chat, "messages", messages=[])


def test_unknown_keys_are_ignored_and_message_extras_kept():
    req = chat(foo=1, messages=[{"role": "user", "content": "x", "extra": {"a": 1}, "name": None}])
    assert req.messages[0].content == "x"


def test_template_messages_normalise():
    req = chat(messages=[
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "reasoning": "r", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
            {"id": "2", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]},
        {"role": "tool", "content": "ok", "id": "1"},
    ])
    msgs = template_messages(req)
    assert msgs[0] == {"role": "system", "content": "sys"}
    assert msgs[1]["content"] == "a\nb"
    assert msgs[2]["content"] == "" and msgs[2]["reasoning_content"] == "r"
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert msgs[2]["tool_calls"][1]["function"]["arguments"] == "{bad"
    assert msgs[3] == {"role": "tool", "content": "ok"}


def test_template_messages_reject_images_and_unknown_roles():
    req = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(APIError) as e:
        template_messages(req)
    assert e.value.param == "messages[0].content[0]"
    req = chat(messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(APIError) as e:
        template_messages(req)
    assert e.value.param == "messages[0].role"


def completion(**kw):
    body = {"model": "m", "prompt": "hi", **kw}
    req = parse_body(json.dumps(body).encode(), CompletionRequest)
    check_completion(req, V)
    return req


def test_completion_rules():
    assert completion().max_tokens == 16
    bad(completion, "suffix", suffix="x")
    bad(completion, "logprobs", logprobs=30)
    bad(completion, "prompt", prompt=[1, 2, V + 5])
    bad(completion, "prompt", prompt="")
    bad(completion, "best_of", best_of=3)
    assert completion(prompt=[[1, 2], [3]]).prompt == [[1, 2], [3]]
