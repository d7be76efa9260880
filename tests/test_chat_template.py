"""Chat template rendering: identical to transformers' apply_chat_template (the oracle, on the same
tokenizer.json + official templates), the literal examples of chat_format.md §5, and our additions
(text-part flattening, reasoning aliases, errors)."""

import copy
import json
import os

import pytest

from qwen3next.chat_template import builtin_template, render_chat
from qwen3next.tokenizer import get_tokenizer
from tests.helpers.qwen_vocab import qwen_tokenizer_dir

THINKING = builtin_template("qwen3_next_thinking")
INSTRUCT = builtin_template("qwen3_next_instruct")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "description": "Heure locale <b>é</b> & 'x'",
                                         "parameters": {"type": "object", "properties": {}}}}  # fmt: skip


def _call(city, as_string):
    args = {"city": city, "note": "naïve <ok>"}
    return {"id": f"call_{city}", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps(args, ensure_ascii=False) if as_string else args}}  # fmt: skip


CONVERSATIONS = {
    "system_user": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"}],
    "no_system": [{"role": "user", "content": "Hi"}],
    "multi_turn_reasoning": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "R2\n</think>\n\nA2"},
        {"role": "user", "content": "Q3"},
    ],
    "tool_loop": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "reasoning_content": "Need weather.",
         "tool_calls": [_call("Paris", True), _call("Rome", False)]},
        {"role": "tool", "tool_call_id": "call_Paris", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_Rome", "content": "25C"},
        {"role": "assistant", "content": "Let me also check the time.", "reasoning_content": "Time too.",
         "tool_calls": [{"name": "get_time", "arguments": {}}]},
        {"role": "tool", "content": "12:00"},
    ],
    "qwen_agent_style": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>",
         "reasoning_content": "call it"},
        {"role": "user", "content": "<tool_response>\n18C\n</tool_response>"},
    ],
    "final_assistant": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": "R"}],
    "late_system": [{"role": "user", "content": "Q"}, {"role": "system", "content": "Now in French."},
                    {"role": "user", "content": "Q2"}],
    "unicode": [{"role": "user", "content": "你好 👋 <|im_start|> {\"a\": 1}"}],
}  # fmt: skip


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    path = qwen_tokenizer_dir()
    if path is None:
        pytest.skip("qwen-agent (qwen.tiktoken) not installed")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"),
                                                chat_template=THINKING, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")  # fmt: skip


@pytest.fixture(scope="module")
def qwen():
    path = qwen_tokenizer_dir()
    if path is None:
        pytest.skip("qwen-agent (qwen.tiktoken) not installed")
    return get_tokenizer(path)


@pytest.mark.parametrize("template", ["thinking", "instruct"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("with_tools", [False, True])
def test_matches_hf(hf, qwen, template, name, with_tools):
    messages = CONVERSATIONS[name]
    tools = [WEATHER, TIME] if with_tools else None
    tmpl = THINKING if template == "thinking" else INSTRUCT
    gen = name != "final_assistant"
    before = copy.deepcopy(messages)
    ours = qwen.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, chat_template=tmpl)
    want = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, chat_template=tmpl, tokenize=False)
    assert ours == want
    assert messages == before  # the caller's messages are not touched
    ids = qwen.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, chat_template=tmpl, tokenize=True)
    hf_ids = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, chat_template=tmpl,
                                    tokenize=True, return_dict=False)  # fmt: skip
    assert ids == list(hf_ids)


def test_continue_final_message_matches_hf(hf, qwen):
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "The answer is"}]
    ours = qwen.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    want = hf.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert ours == want and ours.endswith("The answer is")
    with pytest.raises(ValueError, match="continue_final_message"):
        qwen.apply_chat_template(messages, add_generation_prompt=True, continue_final_message=True)


def test_list_of_parts_is_flattened(hf, qwen):
    parts = [{"role": "system", "content": [{"type": "text", "text": "Sys"}]},
             {"role": "user", "content": [{"type": "text", "text": "line 1"}, {"type": "text", "text": "line 2"}]},
             {"role": "assistant", "content": None, "tool_calls": [_call("Paris", False)]},
             {"role": "tool", "content": [{"type": "text", "text": "18C"}]}]  # fmt: skip
    flat = [{"role": "system", "content": "Sys"}, {"role": "user", "content": "line 1\nline 2"},
            {"role": "assistant", "tool_calls": [_call("Paris", False)]}, {"role": "tool", "content": "18C"}]  # fmt: skip
    for tools in (None, [WEATHER]):
        ours = qwen.apply_chat_template(parts, tools=tools)
        assert ours == hf.apply_chat_template(flat, tools=tools, add_generation_prompt=True, tokenize=False)
        assert "line 1\nline 2" in ours and "18C" in ours


def test_spec_examples(qwen):
    render = qwen.apply_chat_template
    a = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"}]
    head = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert render(a) == head + "<|im_start|>assistant\n<think>\n"
    assert render(a, chat_template=INSTRUCT) == head + "<|im_start|>assistant\n"
    b_want = ("<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
              "<|im_start|>assistant\n<think>\n")  # fmt: skip
    for a1 in ({"content": "A1", "reasoning_content": "R1"}, {"content": "R1\n</think>\n\nA1"},
               {"content": "A1", "reasoning": "R1"}):  # fmt: skip
        b = [{"role": "user", "content": "Q1"}, {"role": "assistant", **a1}, {"role": "user", "content": "Q2"}]
        assert render(b) == b_want  # reasoning before the last user query is dropped
    b = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "R1\n</think>\n\nA1"}]
    assert "R1\n</think>\n\nA1" in render(b + [{"role": "user", "content": "Q2"}], chat_template=INSTRUCT)
    d = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": "R"}]
    assert render(d, add_generation_prompt=False) == (
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n")
    c = CONVERSATIONS["tool_loop"][1:5]
    text = render(c, tools=[WEATHER])
    assert json.dumps(WEATHER) in text  # HF tojson: ", " / ": " separators, keys in order
    assert text.endswith(
        "<|im_start|>assistant\n<think>\nNeed weather.\n</think>\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "note": "naïve <ok>"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Rome", "note": "naïve <ok>"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n25C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")
    # tojson keeps non-ASCII and does not HTML-escape
    assert "Heure locale <b>é</b> & 'x'" in render(a, tools=[TIME])
    # enable_thinking has no effect on these templates; an empty tools list is no tools
    assert render(a, enable_thinking=False) == render(a) == render(a, tools=[])


def test_kwargs_and_named_templates(qwen):
    msgs = [{"role": "user", "content": "x"}]
    custom = "{{ bos_token if bos_token else '' }}{{ eos_token }}|{{ greeting }}|{{ messages[0].content }}"
    assert qwen.apply_chat_template(msgs, chat_template=custom, greeting="hey") == "<|im_end|>|hey|x"
    named = {"default": "D{{ messages|length }}", "tool_use": "T{{ tools|length }}"}
    assert render_chat(named["default"], msgs) == "D1"
    from qwen3next.tokenizer import Tokenizer

    tok = Tokenizer(qwen.backend, qwen.config, [{"name": k, "template": v} for k, v in named.items()])
    assert tok.apply_chat_template(msgs) == "D1"
    assert tok.apply_chat_template(msgs, tools=[WEATHER]) == "T1"
    assert tok.apply_chat_template(msgs, chat_template="tool_use", tools=[]) == "T0"


def test_bad_messages(qwen):
    with pytest.raises(ValueError, match=r"messages\[0\].content\[1\]: only text parts"):
        qwen.apply_chat_template([{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}])  # fmt: skip
    with pytest.raises(ValueError, match="messages"):
        qwen.apply_chat_template("hello")
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        qwen.apply_chat_template([{"content": "x"}])
    with pytest.raises(ValueError, match="tools"):
        qwen.apply_chat_template([{"role": "user", "content": "x"}], tools={"a": 1})
