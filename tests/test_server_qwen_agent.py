"""Qwen-Agent 0.0.34 `Assistant` against the real server (openai_api.md §8), in its three modes:
prompt-based (nous) tool calls with the server splitting reasoning, the same with
`thought_in_content` against a server that does not split, and native tools (`use_raw_api`)."""

import json

import pytest

pytest.importorskip("qwen_agent")

from qwen_agent.agents import Assistant  # noqa: E402
from qwen_agent.tools.base import BaseTool, register_tool  # noqa: E402

from tests.helpers.server_harness import ServerHarness  # noqa: E402

CALLS: list[dict] = []


@register_tool("qn_get_weather", allow_overwrite=True)
class GetWeather(BaseTool):
    description = "Get the weather of a city"
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

    def call(self, params, **kwargs):
        CALLS.append(json.loads(params) if isinstance(params, str) else params)
        return "18C and sunny"


CALL = '\n{"name": "qn_get_weather", "arguments": {"city": "Paris"}}\n'


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from tests.helpers.checkpoints import make_tiny_checkpoint

    # Qwen-Agent's system prompts are long for the tiny byte-level tokenizer: a longer context
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("qa_ckpt"), max_position_embeddings=2048)
    h = ServerHarness(ckpt, "--served-model-name", "tiny")
    yield h
    h.close()


def run_agent(srv, generate_cfg):
    CALLS.clear()
    llm = {"model": "tiny", "model_server": srv.url + "/v1", "api_key": "EMPTY",
           "generate_cfg": {"max_tokens": 60, **generate_cfg}}
    bot = Assistant(llm=llm, function_list=["qn_get_weather"])
    responses = []
    for responses in bot.run(messages=[{"role": "user", "content": "Weather in Paris?"}]):
        pass
    assert srv.wait_idle()
    return responses


def check(responses, answer="It is 18C.", raw_thought=False):
    assert CALLS == [{"city": "Paris"}]
    calls = [m for m in responses if m.get("function_call")]
    assert calls and calls[0]["function_call"]["name"] == "qn_get_weather"
    results = [m for m in responses if m["role"] == "function"]
    assert results and results[0]["content"] == "18C and sunny"
    final = responses[-1]
    assert final["role"] == "assistant"
    if raw_thought:  # the server did not split: the thought reaches the client inside content
        assert final["content"].endswith(answer) and "</think>" in final["content"]
    else:
        assert final["content"].strip() == answer


def test_nous_prompt_tools_with_reasoning_split(srv):
    srv.push("Need weather.\n", "</think>", "\n\n", "<tool_call>", CALL, "</tool_call>")
    srv.push("Got it.\n", "</think>", "\n\nIt is 18C.")
    responses = run_agent(srv, {})
    check(responses)
    assert any(m.get("reasoning_content") for m in responses)
    # Qwen-Agent injected the tools itself and sent the result back as a <tool_response> user turn
    second = srv.tok.decode(srv.sampler.seen_prompts[-1])
    assert "<tool_response>" in second and "18C and sunny" in second


def test_thought_in_content_with_server_split_off(srv):
    srv.state.reasoning_parser = None
    try:
        srv.push("Need weather.\n", "</think>", "\n\n", "<tool_call>", CALL, "</tool_call>")
        srv.push("Got it.\n", "</think>", "\n\nIt is 18C.")
        responses = run_agent(srv, {"thought_in_content": True})
    finally:
        srv.state.reasoning_parser = "qwen3"
    check(responses, raw_thought=True)


def test_native_tools_raw_api(srv):
    srv.push("Need weather.\n", "</think>", "\n\n", "<tool_call>", CALL, "</tool_call>")
    srv.push("Got it.\n", "</think>", "\n\nIt is 18C.")
    responses = run_agent(srv, {"use_raw_api": True})
    check(responses)
    # the tools went through the chat template, and the result came back as a tool turn
    first, second = (srv.tok.decode(p) for p in srv.sampler.seen_prompts[-2:])
    assert "# Tools" in first and "qn_get_weather" in first
    assert "<tool_response>\n18C and sunny\n</tool_response>" in second
