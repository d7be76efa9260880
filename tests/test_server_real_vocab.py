"""The server with the real Qwen3 tokenizer (151 669 tokens, built offline from qwen-agent's ranks) on a
tiny random model: the real special-token ids (<think> 151667, </think> 151668, <tool_call> 151657,
EOS 151645 / 151643) and multi-byte characters split across tokens go through the whole path."""

import json

import pytest

openai = pytest.importorskip("openai")

from tests.helpers.qwen_vocab import qwen_tokenizer_dir, write_qwen_tokenizer  # noqa: E402
from tests.helpers.server_harness import ServerHarness  # noqa: E402


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    if qwen_tokenizer_dir() is None:
        pytest.skip("qwen-agent (the source of qwen.tiktoken) is not installed")
    from tests.helpers.checkpoints import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("real_vocab"), with_tokenizer=False, with_mtp=False,
                                vocab_size=151936, eos_token_id=151645, max_shard_size="100MB")
    write_qwen_tokenizer(path)
    h = ServerHarness(path, "--served-model-name", "q")
    yield h
    h.close()


def test_real_ids_reasoning_emoji_and_tool_call(srv):
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="EMPTY", max_retries=0)
    assert srv.state.reasoning_parser == "qwen3" and srv.state.eos_ids == {151643, 151645}
    srv.push("The user greets 👨‍👩‍👧.\n", "</think>", "\n\nHello 👋!")
    chunks = list(c.chat.completions.create(model="q", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=60, stream=True))
    # the Thinking generation prompt, as chat_format.md gives its ids
    assert srv.sampler.seen_prompts[-1][-5:] == [151644, 77091, 198, 151667, 198]
    assert srv.ids("</think>") == [151668]
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert reasoning == "The user greets 👨‍👩‍👧.\n" and content == "\n\nHello 👋!"
    assert "\ufffd" not in reasoning + content  # no half characters were sent
    srv.push("x", "</think>", "\n\n", "<tool_call>", '\n{"name": "f", "arguments": {"q": "naïve"}}\n', "</tool_call>")
    r = c.chat.completions.create(model="q", messages=[{"role": "user", "content": "go"}], max_tokens=60,
                                  tools=[{"type": "function", "function": {"name": "f"}}])
    (call,) = r.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"q": "naïve"} and r.choices[0].finish_reason == "tool_calls"
    assert srv.ids("<tool_call>") == [151657]
    assert srv.wait_idle()
