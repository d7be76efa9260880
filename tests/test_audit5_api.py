"""Audit (session 5) of the OpenAI layer as real clients hit it: bodies that are valid JSON but
break later stages (deep nesting, lone surrogates) must be 400s naming the field, not 500s."""

import json

import pytest

pytest.importorskip("pydantic")

from qwen3next.api.errors import APIError  # noqa: E402
from qwen3next.api.protocol import ChatCompletionRequest, CompletionRequest  # noqa: E402
from qwen3next.api.validate import parse_body  # noqa: E402


def _bad(raw: bytes, model=ChatCompletionRequest) -> APIError:
    with pytest.raises(APIError) as e:
        parse_body(raw, model)
    assert e.value.status == 400
    json.dumps(e.value.body(), ensure_ascii=False).encode("utf-8")  # the error body itself is sendable
    return e.value


def test_deeply_nested_body_is_a_400():
    err = _bad(b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert "nested too deeply" in err.message


@pytest.mark.parametrize("raw,param", [
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages[0].content[0].text"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": ["ok", "\\udc00"]}', "stop[1]"),
    (b'{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"k\\ud800": 1}}',
     "chat_template_kwargs.k\\ud800"),
])
def test_lone_surrogate_is_a_400_naming_the_field(raw, param):
    err = _bad(raw)
    assert err.param == param and "surrogate" in err.message


def test_lone_surrogate_in_a_completion_prompt():
    assert _bad(b'{"prompt": "\\ud83d"}', CompletionRequest).param == "prompt"


def test_surrogate_pairs_still_parse():
    req = parse_body(b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00 \\u00e9"}]}', ChatCompletionRequest)
    assert req.messages[0].content == "\U0001F600 \u00e9"


@pytest.mark.parametrize("field", ["chat_template_kwargs", "guided_json"])
def test_nesting_is_bounded_before_the_template_and_the_schema_recurse(field):
    inner = "1"
    for _ in range(400):  # json.loads takes it; the template's _plain and the schema rewrite did not
        inner = '{"a": ' + inner + "}"
    body = '{"messages": [{"role": "user", "content": "x"}], "%s": {"k": %s}}' % (field, inner)
    assert "nested more than 128 levels" in _bad(body.encode()).message
    fine = '{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"k": %s}}' % (
        "[" * 100 + "]" * 100)
    assert parse_body(fine.encode(), ChatCompletionRequest).chat_template_kwargs["k"] is not None


def test_long_prompts_tokenize_without_holding_the_gil(tiny_ckpt):
    """The server tokenizes in a worker thread; that only keeps its event loop (other streams,
    /health) running if the tokenizer lets go of the GIL. tokenizers' encode held it from its second
    long call on: every 5 MB prompt after the first stalled the server for 10 s."""
    import asyncio
    import time

    from qwen3next.tokenizer import get_tokenizer

    tok = get_tokenizer(tiny_ckpt)
    text = "<|im_start|>user\n" + "1 + 1 = 2. " * 40_000 + "<|im_end|>\n<|im_start|>assistant\n"

    async def timed() -> tuple[list[int], float, float]:
        lags, done = [], asyncio.Event()

        async def tick():
            while not done.is_set():
                t = time.perf_counter()
                await asyncio.sleep(0.005)
                lags.append(time.perf_counter() - t)

        ticker = asyncio.create_task(tick())
        t = time.perf_counter()
        ids = await asyncio.to_thread(tok.encode, text)
        took = time.perf_counter() - t
        done.set()
        await ticker
        return ids, took, max(lags)

    async def run():
        await asyncio.to_thread(tok.encode, text)  # the first long call tends to let go anyway
        return [await timed() for _ in range(3)]

    expect = tok.backend.encode(text, add_special_tokens=False).ids
    for ids, took, worst in asyncio.run(run()):
        assert ids == expect
        assert worst < max(0.5 * took, 0.05), (took, worst)


@pytest.mark.parametrize("model,body,param", [
    (CompletionRequest, {"prompt": ["a", 5]}, "prompt[1]"),  # was "prompt: should be a valid string"
    (CompletionRequest, {"prompt": [[1, "x"]]}, "prompt[0][1]"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "stop": 5}, "stop"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"},
     "tool_choice"),
])
def test_union_errors_name_the_deepest_field(model, body, param):
    assert _bad(json.dumps(body).encode(), model).param == param


def test_text_part_without_a_string_names_its_text():
    from qwen3next.api.validate import template_messages

    req = parse_body(b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
                     ChatCompletionRequest)
    with pytest.raises(APIError) as e:  # was: "content part 'text' is not supported"
        template_messages(req)
    assert e.value.param == "messages[0].content[0].text" and "must be a string" in e.value.message


@pytest.mark.parametrize("model,field,default", [
    (ChatCompletionRequest, "n", 1), (ChatCompletionRequest, "stream", False),
    (ChatCompletionRequest, "logprobs", False), (ChatCompletionRequest, "add_generation_prompt", True),
    (ChatCompletionRequest, "skip_special_tokens", True), (CompletionRequest, "echo", False),
    (CompletionRequest, "n", 1),
])
def test_null_means_not_given(model, field, default):
    """OpenAI types these "X or null"; a client sending null got 400 "should be a valid integer"."""
    body = {"messages": [{"role": "user", "content": "x"}]} if model is ChatCompletionRequest else {"prompt": "x"}
    req = parse_body(json.dumps({**body, field: None}).encode(), model)
    assert getattr(req, field) == default


def test_null_stays_null_where_it_means_something():
    # vLLM: completions max_tokens null = the rest of the context (16 only when absent)
    assert parse_body(b'{"prompt": "x", "max_tokens": null}', CompletionRequest).max_tokens is None
    assert parse_body(b'{"prompt": "x"}', CompletionRequest).max_tokens == 16
    assert _bad(b'{"messages": null}').param == "messages"  # required: still an error


def test_broken_tokenizer_json_names_the_file(tiny_ckpt, tmp_path):
    import os
    import shutil

    from qwen3next.tokenizer import get_tokenizer

    for name in os.listdir(tiny_ckpt):
        shutil.copy(os.path.join(tiny_ckpt, name), tmp_path / name)
    (tmp_path / "tokenizer.json").write_text("{bad")
    with pytest.raises(ValueError) as e:  # was tokenizers' bare "key must be a string at line 1 column 2"
        get_tokenizer(str(tmp_path))
    assert str(tmp_path / "tokenizer.json") in str(e.value)
    os.remove(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        get_tokenizer(str(tmp_path))
