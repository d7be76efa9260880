"""The real server on loopback (uvicorn thread, tiny checkpoint) driven by the official openai client.

Reasoning and tool-call paths use the harness's scripted sampler: the random model "emits" a
given token sequence, so the assertions check the server's parsing, framing and bookkeeping.
"""

import asyncio
import json

import pytest

openai = pytest.importorskip("openai")

from tests.helpers.server_harness import ServerHarness  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def srv(tiny_ckpt):
    h = ServerHarness(tiny_ckpt, "--served-model-name", "tiny", "tiny-alias", "--max-num-seqs", "4",
                      "--max-waiting", "4", "--trust-request-chat-template")
    yield h
    h.close()


def test_reasoning_split_non_streaming(srv, client):
    srv.push("Let me think.\n", "</think>", "\n\nParis is nice.")
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=40)
    m = r.choices[0].message
    assert m.reasoning_content == "Let me think.\n" and m.model_extra["reasoning"] == "Let me think.\n"
    assert m.content == "\n\nParis is nice."
    assert r.choices[0].finish_reason == "stop"
    n_reason = len(srv.ids("Let me think.\n"))
    assert r.usage.completion_tokens_details.reasoning_tokens == n_reason
    assert r.usage.completion_tokens == len(srv.ids("Let me think.\n</think>\n\nParis is nice.")) + 1  # + EOS
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_reasoning_stream_switches_even_when_tag_is_cut(srv, client):
    # "</think>" arrives as plain-text pieces across tokens, not as the single added token
    srv.push("Hmm, fox. <", "/thi", "nk", ">", "\n\nThe answer.")
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == "Hmm, fox. " and content == "\n\nThe answer."
    assert not any("</" in (c.choices[0].delta.content or "") for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_reasoning_off_per_request_gives_raw_content(srv, client):
    srv.push("R\n", "</think>", "\n\nA")
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=20,
                                       extra_body={"separate_reasoning": False})
    assert r.choices[0].message.content == "R\n</think>\n\nA"
    assert r.choices[0].message.model_extra.get("reasoning_content") is None


def test_no_think_end_means_all_reasoning(srv, client):
    srv.push("still thinking about it")
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content is None and r.choices[0].message.reasoning_content


def test_tool_call_non_streaming(srv, client):
    srv.push("Need weather.\n", "</think>", "\n\n", "<tool_call>",
             '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n', "</tool_call>")
    r = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], max_tokens=80)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    (call,) = c.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id and c.message.reasoning_content == "Need weather.\n"
    # the tools reached the template
    assert "get_weather" in srv.tok.decode(srv.sampler.seen_prompts[-1])


def test_tool_calls_streaming_id_and_name_once(srv, client):
    body = '\n{"name": "get_weather", "arguments": {"city": "%s"}}\n'
    srv.push("x", "</think>", "\n\n", "<tool_call>", body % "Paris", "</tool_call>", "\n",
             "<tool_call>", body % "Rome", "</tool_call>")
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER],
                                                 max_tokens=120, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    heads = [d for d in deltas if d.id]
    assert [d.index for d in heads] == [0, 1] and all(d.function.name == "get_weather" for d in heads)
    assert not any(d.function.name for d in deltas if not d.id)
    for i, city in enumerate(["Paris", "Rome"]):
        args = "".join(d.function.arguments or "" for d in deltas if d.index == i)
        assert json.loads(args) == {"city": city}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "<tool_call>" not in "".join(c.choices[0].delta.content or "" for c in chunks)


def test_malformed_tool_json_stays_content(srv, client):
    srv.push("x", "</think>", "<tool_call>", '\n{"name": "get_weather", "arguments": {bad\n', "</tool_call>")
    r = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], max_tokens=60)
    c = r.choices[0]
    assert c.finish_reason == "stop" and not c.message.tool_calls and "<tool_call>" in c.message.content


def test_tool_choice_none_keeps_text_and_named_is_guided(srv, client):
    srv.push("x", "</think>", "<tool_call>", '\n{"name": "get_weather", "arguments": {}}\n', "</tool_call>")
    r = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], tool_choice="none",
                                       max_tokens=60)
    assert not r.choices[0].message.tool_calls and "<tool_call>" in r.choices[0].message.content
    # named: the model reasons freely; after its </think> the call is prefilled up to the name,
    # which the grammar allows to be this function's only
    srv.push("Use the tool.\n", "</think>")  # phase 1: stops at </think>
    srv.push('get_weather", "arguments": {"city": "Rome"}}\n', "</tool_call>")  # phase 2: the rest
    r = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], max_tokens=60,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    m = r.choices[0].message
    (call,) = m.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Rome"} and call.function.name == "get_weather"
    assert m.reasoning_content == "Use the tool.\n" and r.choices[0].finish_reason == "tool_calls"
    assert srv.tok.decode(srv.sampler.seen_prompts[-1]).endswith(
        'Use the tool.\n</think>\n\n<tool_call>\n{"name": "')
    # (the call's grammar is complete at </tool_call>: the request stops there, no EOS sampled)
    n_phase = len(srv.ids("Use the tool.\n</think>", 'get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'))
    assert r.usage.completion_tokens == n_phase  # the prefill is not a completion token
    srv.push("Hmm.\n", "</think>")
    srv.push('get_weather", "arguments": {"city": "Oslo"}}\n', "</tool_call>")
    r = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], max_tokens=60,
                                       tool_choice="required", stream=True)
    chunks = list(r)
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas if d.id] == ["get_weather"]
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Oslo"}
    # one entry per call index in a chunk (the announcement carries the first fragment), as OpenAI sends
    assert len(deltas) == len([c for c in chunks if c.choices and c.choices[0].delta.tool_calls])
    assert deltas[0].function.arguments == "{"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_forced_calls_follow_the_tools_schemas(srv, client):
    pytest.importorskip("llguidance")
    from qwen3next.chat_template import builtin_template

    # no script: the random tiny model samples under the forced call's grammar (Instruct template:
    # from the first token; Thinking: after the model's </think>, made likely by the bias)
    trip = {"type": "function", "function": {"name": "trip", "parameters": {"type": "object", "properties": {
        "to": {"enum": ["Rome", "Oslo"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["to"]}}}
    instruct = {"chat_template": builtin_template("qwen3_next_instruct")}
    think = {"logit_bias": {str(srv.tok.token_to_id("</think>")): 100}}
    # (one tool, a short prompt: the tiny tokenizer spends ~1 token per character, the call prefix too)
    for extra in (instruct, think):
        for choice in ({"type": "function", "function": {"name": "trip"}}, "required"):
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go"}],
                                               tools=[trip], max_tokens=75, seed=1, temperature=1.0,
                                               tool_choice=choice, extra_body=extra)
            assert r.choices[0].message.tool_calls, (extra.keys(), choice, r.choices[0].message.content)
            (call,) = r.choices[0].message.tool_calls
            args = json.loads(call.function.arguments)
            assert call.function.name == "trip" and r.choices[0].finish_reason == "tool_calls"
            assert args["to"] in ("Rome", "Oslo") and set(args) <= {"to", "n"} and 0 <= args.get("n", 0) <= 9


def test_n_samples_and_seed(srv, client):
    r = client.chat.completions.create(model="tiny-alias", messages=USER, max_tokens=5, n=3, seed=7,
                                       temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2] and r.model == "tiny-alias"
    # the same seed gives the same samples (each of the n draws from seed + index)
    again = client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, n=3, seed=7,
                                           temperature=1.0)
    assert [c.message.reasoning_content for c in r.choices] == [c.message.reasoning_content for c in again.choices]
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, n=2, stream=True))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_stop_string_and_logprobs(srv, client):
    srv.push("one two ", "</think>", "alpha STOP beta")
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=40, stop=["STOP"],
                                       logprobs=True, top_logprobs=2)
    c = r.choices[0]
    assert c.message.content == "alpha " and c.finish_reason == "stop" and c.model_extra["stop_reason"] == "STOP"
    assert c.logprobs.content and all(len(e.top_logprobs) == 2 for e in c.logprobs.content)
    assert all(e.logprob <= 0 for e in c.logprobs.content)


def test_async_client_streaming(srv, client):
    async def run():
        ac = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="EMPTY", max_retries=0)
        srv.push("a", "</think>", "b")
        stream = await ac.chat.completions.create(model="tiny", messages=USER, max_tokens=10, stream=True)
        text = [c.choices[0].delta.content async for c in stream if c.choices]
        r = await ac.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
        await ac.close()
        return "".join(t or "" for t in text), r

    text, r = asyncio.run(run())
    assert text == "b" and r.choices[0].finish_reason == "length"


def test_completions_endpoint(srv, client):
    # ignore_eos: the tiny random model may sample its EOS early, which would shorten a choice
    r = client.completions.create(model="tiny", prompt=["Hello", "The fox"], max_tokens=3, n=2, logprobs=1,
                                  echo=True, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    # echo + logprobs (vLLM): the prompt's tokens come first, the first one's logprob null
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("Hello") and len(lp.tokens) == len(srv.ids("Hello")) + 3
    assert lp.token_logprobs[0] is None and None not in lp.token_logprobs[1:]
    assert r.usage.completion_tokens == 12
    srv.push("quick brown")
    chunks = list(client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=10, stream=True,
                                            logprobs=2))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "quick brown"
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert "".join(tokens).startswith("quick brown")  # + the EOS token's entry
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logit_bias_forces_and_bans_tokens(srv, client):
    # the real sampler (nothing scripted): +100 makes greedy pick the token every time
    tok = srv.ids("fox")[0]
    piece = srv.tok.decode([tok])
    kw = dict(model="tiny", max_tokens=3, temperature=0, logit_bias={str(tok): 100},
              extra_body={"ignore_eos": True})
    r = client.completions.create(prompt="Hello", **kw)
    assert piece and r.choices[0].text == piece * 3
    m = client.chat.completions.create(messages=USER, **kw).choices[0].message
    assert (m.reasoning_content or "") + (m.content or "") == piece * 3
    # sampled rows: +100 on two tokens leaves only those two
    a, b = srv.ids("fox")[0], srv.ids("dog")[0]
    assert a != b
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=1.0, n=2, seed=1,
                                  logprobs=0, logit_bias={str(a): 100, str(b): 100},
                                  extra_body={"ignore_eos": True})
    for c in r.choices:
        assert len(c.logprobs.tokens) == 8 and set(c.logprobs.tokens) <= {piece, srv.tok.decode([b])}


def test_return_tokens_as_token_ids_and_logit_bias_ban(srv, client):
    # greedy picks some token t; banning t (-100) must change the first token, seen by id
    kw = dict(model="tiny", prompt="Hello", max_tokens=1, temperature=0, logprobs=1,
              extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    first = client.completions.create(**kw).choices[0].logprobs
    assert first.tokens[0].startswith("token_id:") and all(k.startswith("token_id:") for k in first.top_logprobs[0])
    banned = int(first.tokens[0].split(":")[1])
    again = client.completions.create(logit_bias={str(banned): -100}, **kw).choices[0].logprobs.tokens[0]
    assert again.startswith("token_id:") and int(again.split(":")[1]) != banned
    m = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    for entry in m.choices[0].logprobs.content:
        assert entry.token.startswith("token_id:") and all(t.token.startswith("token_id:") for t in entry.top_logprobs)
    plain = client.completions.create(model="tiny", prompt="Hello", max_tokens=1, temperature=0, logprobs=1,
                                      extra_body={"ignore_eos": True})
    assert not plain.choices[0].logprobs.tokens[0].startswith("token_id:")


def test_models_health_version_metrics(srv, client):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-alias"]
    client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, extra_body={"ignore_eos": True})
    import httpx

    assert httpx.get(srv.url + "/health").status_code == 200
    assert "version" in httpx.get(srv.url + "/version").json()
    text = httpx.get(srv.url + "/metrics").text
    for name in ("qwen3next:time_to_first_token_seconds_bucket", "qwen3next:inter_token_latency_seconds",
                 "qwen3next:e2e_request_latency_seconds", "qwen3next:num_requests_waiting",
                 "qwen3next:kv_cache_usage_perc", "qwen3next:generation_tokens_total"):
        assert name in text


def test_continuous_usage_and_include_reasoning_false(srv, client):
    srv.push("secret plan\n", "</think>", "\n\nHi")
    chunks = list(client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=20, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"include_reasoning": False}))
    with_choices = [c for c in chunks if c.choices]
    assert all(c.usage is not None for c in with_choices)
    counts = [c.usage.completion_tokens for c in with_choices]
    assert counts == sorted(counts) and counts[-1] == chunks[-1].usage.completion_tokens
    assert not any(c.choices[0].delta.model_extra.get("reasoning_content") for c in with_choices)
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == "\n\nHi"


def test_stop_string_in_one_of_n_samples(srv, client):
    srv.sampler.sticky = srv.ids("x", "</think>", "one two three" + " four" * 60)
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=60, n=2, stop=["three"])
    assert [c.text for c in r.choices] == ["x</think>one two "] * 2
    assert all(c.finish_reason == "stop" for c in r.choices)
    # the stopped samples were finished in the engine, not left generating to max_tokens
    assert r.usage.completion_tokens < 30


def test_continue_final_message_and_echo(srv, client):
    srv.push(" sunny.")
    msgs = USER + [{"role": "assistant", "content": "It is"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, extra_body={
        "continue_final_message": True, "add_generation_prompt": False, "echo": True,
        "separate_reasoning": False})
    assert r.choices[0].message.content == "It is sunny."
    assert srv.tok.decode(srv.sampler.seen_prompts[-1]).endswith("It is")


def test_tokenize_detokenize(srv, client):
    import httpx

    r = httpx.post(srv.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == srv.tok.encode("Hello world") and r["count"] == len(r["tokens"])
    chat = httpx.post(srv.url + "/tokenize", json={"messages": USER}).json()
    assert srv.tok.decode(chat["tokens"], skip_special_tokens=False).endswith("<think>\n")
    back = httpx.post(srv.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == "Hello world"
    assert httpx.post(srv.url + "/detokenize", json={"tokens": [-1]}).status_code == 400


def test_forced_call_on_instruct_template_and_budget(srv, client):
    from qwen3next.chat_template import builtin_template

    instruct = builtin_template("qwen3_next_instruct")
    srv.push('get_weather", "arguments": {"city": "Rome"}}\n', "</tool_call>")
    r = client.chat.completions.create(
        model="tiny", messages=USER, tools=[WEATHER], max_tokens=60, extra_body={"chat_template": instruct},
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = r.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Rome"}
    assert r.choices[0].message.reasoning_content is None  # no think block opened: nothing to split
    assert srv.tok.decode(srv.sampler.seen_prompts[-1], skip_special_tokens=False).endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "')
    # Thinking, n=2, and a budget the reasoning uses up: no call, finish "length", nothing leaks
    srv.sampler.sticky = srv.ids("thinking and thinking and thinking")
    r = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], max_tokens=4, n=2,
                                       tool_choice="required")
    assert [c.finish_reason for c in r.choices] == ["length", "length"]
    assert not any(c.message.tool_calls for c in r.choices)


def test_speculative_decoding_server(tiny_ckpt):
    h = ServerHarness(tiny_ckpt, "--served-model-name", "tiny", "--max-num-seqs", "4",
                      "--speculative-config", '{"method": "qwen3_next_mtp", "num_speculative_tokens": 2}')
    try:
        assert h.engine.args.speculative_config is not None
        c = openai.OpenAI(base_url=h.url + "/v1", api_key="EMPTY", max_retries=0)
        kw = dict(model="tiny", messages=USER, max_tokens=20, extra_body={"ignore_eos": True}, seed=3)
        r = c.chat.completions.create(**kw)
        assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"
        chunks = list(c.chat.completions.create(stream=True, n=2, **kw))
        assert {ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].finish_reason} == {0, 1}
        assert h.wait_idle()
        import httpx

        text = httpx.get(h.url + "/metrics").text
        assert "qwen3next:spec_decode_acceptance_rate" in text
        # per draft position, the engine's own counts (the 2nd position is drafted only after the 1st)
        spec = h.engine.stats["spec_decode"]
        for pos in range(2):
            for metric, key in (("num_accepted_tokens_per_pos_total", "accepted_per_pos"),
                                ("num_draft_tokens_per_pos_total", "drafted_per_pos")):
                line = f'qwen3next:spec_decode_{metric}{{model_name="tiny",position="{pos}"}}'
                assert f"{line} {float(spec[key][pos])}\n" in text
        assert spec["drafted_per_pos"][0] > 0
    finally:
        h.close()


def test_sse_lines_survive_unicode_line_separators(srv, client):
    import httpx

    srv.push("a\u2028b\x85c\u2029d")
    body = {"model": "tiny", "prompt": "x", "max_tokens": 20, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
        lines = [x for x in r.iter_lines() if x]  # httpx splits with str.splitlines()
    events = [json.loads(x[6:]) for x in lines if x != "data: [DONE]"]
    assert "".join(e["choices"][0]["text"] for e in events) == "a\u2028b\x85c\u2029d"
