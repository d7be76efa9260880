"""Structured outputs through the server and the `openai` client, with the real Qwen3 tokenizer
(151 669 tokens) on a tiny random model: response_format json_schema (create and parse()),
json_object, the vLLM extras on chat and completions, streaming, the Thinking template's grammar
starting after `</think>`, and 400s in OpenAI error form."""

import json
import re
from typing import Literal

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
from pydantic import BaseModel, Field  # noqa: E402

from tests.helpers.qwen_vocab import qwen_tokenizer_dir, write_qwen_tokenizer  # noqa: E402
from tests.helpers.server_harness import ServerHarness  # noqa: E402
from tests.test_structured_output import SCHEMA  # noqa: E402

THINK_END = 151668  # </think>
USER = [{"role": "user", "content": "Describe a colour."}]


class Colour(BaseModel):
    name: Literal["red", "green", "blue"]
    hex_digits: int = Field(ge=0, le=999)
    bright: bool


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    if qwen_tokenizer_dir() is None:
        pytest.skip("qwen-agent (the source of qwen.tiktoken) is not installed")
    from tests.helpers.checkpoints import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("so_real_vocab"), with_tokenizer=False, with_mtp=False,
                                vocab_size=151936, eos_token_id=151645, max_shard_size="100MB")
    write_qwen_tokenizer(path)
    h = ServerHarness(path, "--served-model-name", "q")
    yield h
    h.close()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="EMPTY", max_retries=0)


# the Thinking template opens <think>: the grammar waits for </think>, which the bias makes come first
AFTER_THINK = {"logit_bias": {str(THINK_END): 100}}


def test_json_schema_create_and_stream(srv, client):
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model="q", messages=USER, response_format=fmt, max_tokens=300, n=2,
                                       temperature=1.0, seed=3, extra_body=AFTER_THINK)
    for ch in r.choices:
        assert ch.finish_reason == "stop"
        assert not ch.message.model_extra.get("reasoning_content")  # </think> came first: no reasoning
        jsonschema.validate(json.loads(ch.message.content), SCHEMA)
    # the Thinking prompt left the grammar waiting: free text (reasoning) until </think>
    assert srv.sampler.seen_prompts[-1][-2:] == [151667, 198]
    chunks = client.chat.completions.create(model="q", messages=USER, response_format=fmt, max_tokens=300,
                                            temperature=0, stream=True, extra_body=AFTER_THINK)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert srv.wait_idle()


def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(model="q", messages=USER, response_format=Colour, max_tokens=200,
                                      temperature=0.8, seed=1, extra_body=AFTER_THINK)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Colour) and parsed.name in ("red", "green", "blue")


def test_json_object_and_vllm_extras(client):
    # any JSON object: bias "{" and "}" so the random model closes it at once; the grammar orders them
    bias = {"90": 30, "92": 20, str(THINK_END): 100}  # "{", "}"
    r = client.chat.completions.create(model="q", messages=USER, response_format={"type": "json_object"},
                                       max_tokens=60, temperature=0, extra_body={"logit_bias": bias})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(model="q", messages=USER, max_tokens=20, n=4, temperature=1.0, seed=2,
                                       extra_body={"guided_choice": ["sunny", "rainy day"], **AFTER_THINK})
    assert {c.message.content for c in r.choices} <= {"sunny", "rainy day"}
    r = client.completions.create(model="q", prompt="Email:", max_tokens=40, n=3, temperature=1.0, seed=4,
                                  extra_body={"structured_outputs": {"regex": r"[a-z]{3,8}@qwen\.ai"}})
    assert all(re.fullmatch(r"[a-z]{3,8}@qwen\.ai", c.text) for c in r.choices), [c.text for c in r.choices]
    r = client.completions.create(model="q", prompt="Data:", max_tokens=300, temperature=0,
                                  extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_bad_schema_and_conflicts_are_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="q", messages=USER, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    err = e.value.body
    assert err["param"] == "response_format.json_schema.schema" and "nope" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="q", prompt="x", max_tokens=5, extra_body={"guided_regex": "(unclosed"})
    assert e.value.body["param"] == "guided_regex"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="q", messages=USER, max_tokens=5, tools=tools, tool_choice="required",
                                       response_format={"type": "json_object"})
    assert e.value.body["param"] == "tool_choice"
