"""Structured outputs in the engine (grammar masks from llguidance) on the tiny random model with its
tiny byte-level tokenizer: whatever garbage the weights prefer, the output parses and matches the
schema / regex / choice; the grammar starts after `start_after_token_id`; unconstrained rows in the
same batch sample exactly as alone; with MTP speculative decoding greedy outputs equal the
plain engine's (grammar rows' drafts verified under their masks), sampled ones follow the exact
target distribution; LLM.chat with a Thinking template starts the
grammar after </think>; the request parsing of the server
(response_format, structured_outputs, guided_*) and its 400s."""

import itertools
import json
import math
import os
import re

import numpy as np
import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from qwen3next.sampling_params import SamplingParams  # noqa: E402
from qwen3next.sampling_params import StructuredOutputsParams as S  # noqa: E402

# finite on purpose: a random model fills unbounded strings until max_tokens
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "n", "ok", "tag", "xs"],
          "properties": {"color": {"enum": ["red", "green", "blue"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "ok": {"type": "boolean"},
                         "tag": {"type": "string", "maxLength": 6},
                         "xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                "maxItems": 3}}}


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    from qwen3next.llm import LLM

    return LLM(tiny_ckpt, max_model_len=512, max_num_seqs=8)


def gen(llm, prompts, **kw):
    return [c for o in llm.generate(prompts, SamplingParams(**kw)) for c in o.outputs]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates(llm, temperature):
    outs = gen(llm, ["Hello", "The weather in Paris"], temperature=temperature, seed=7, n=2, max_tokens=300,
               structured_outputs=S(json=SCHEMA))
    for c in outs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
    # without the grammar the same model writes no JSON at all (the test can fail)
    (free,) = gen(llm, ["Hello"], temperature=0.0, max_tokens=40)
    with pytest.raises(ValueError):
        json.loads(free.text)


def test_choice_regex_json_object_and_compact_json(llm):
    outs = gen(llm, ["Hi"], temperature=1.0, n=6, seed=3, max_tokens=20,
               structured_outputs=S(choice=["yes", "no", "maybe not"]))
    assert {c.text for c in outs} <= {"yes", "no", "maybe not"} and len({c.text for c in outs}) > 1
    outs = gen(llm, ["Hi"], temperature=1.0, n=3, seed=4, max_tokens=40,
               structured_outputs=S(regex=r"[a-z]{2,6}@example\.(com|org)"))
    for c in outs:
        assert re.fullmatch(r"[a-z]{2,6}@example\.(com|org)", c.text) and c.finish_reason == "stop"
    for grammar in ('root ::= [a-z]{1,4} "=" [0-9] [0-9]?', 'start: /[a-z]{1,4}/ "=" /[0-9]{1,2}/'):  # GBNF, Lark
        outs = gen(llm, ["Hi"], temperature=1.0, n=2, seed=5, max_tokens=20, structured_outputs=S(grammar=grammar))
        assert all(re.fullmatch(r"[a-z]{1,4}=[0-9]{1,2}", c.text) for c in outs), [c.text for c in outs]
    # any JSON object: the tiny tokenizer has single-byte "{" "}" tokens; bias the closing one
    tok = llm.tokenizer
    close = tok.encode("}")
    assert len(close) == 1
    (c,) = gen(llm, ["Hi"], temperature=0.0, max_tokens=60, logit_bias={close[0]: 30.0},
               structured_outputs=S(json_object=True))
    assert isinstance(json.loads(c.text), dict)
    (c,) = gen(llm, ["Hi"], temperature=0.0, max_tokens=300,
               structured_outputs=S(json=SCHEMA, disable_any_whitespace=True))
    assert not re.search(r"\s", re.sub(r'"(\\.|[^"\\])*"', "", c.text))  # none outside strings
    jsonschema.validate(json.loads(c.text), SCHEMA)


def test_objects_get_no_extra_keys_unless_the_schema_allows_them(llm):
    """vLLM's xgrammar default: properties without additionalProperties mean no other keys."""
    schema = {"type": "object", "required": ["n"], "properties": {
        "n": {"enum": [1, 2]}, "inner": {"type": "object", "properties": {"b": {"type": "boolean"}}}}}
    outs = gen(llm, ["Hi"], temperature=1.0, n=4, seed=9, max_tokens=200, structured_outputs=S(json=schema))
    for c in outs:
        obj = json.loads(c.text)
        assert set(obj) <= {"n", "inner"} and set(obj.get("inner", {})) <= {"b"}, c.text
    from qwen3next.engine.structured_output import no_extra_properties

    assert no_extra_properties({"properties": {}, "additionalProperties": True}) == {
        "properties": {}, "additionalProperties": True}


def test_grammar_starts_after_token_and_logprobs_stay_raw(llm):
    """start_after_token_id: free text until that token (a Thinking model's </think>), then the
    grammar. logit_bias makes the random model emit the token first; afterwards it is masked."""
    tok = llm.tokenizer
    end = tok.token_to_id("</think>")
    (c,) = gen(llm, ["Hi"], temperature=0.0, max_tokens=300, logit_bias={end: 100.0}, logprobs=1,
               structured_outputs=S(json=SCHEMA, start_after_token_id=end))
    assert c.token_ids[0] == end and end not in c.token_ids[1:]
    body = tok.decode(c.token_ids[1:])
    jsonschema.validate(json.loads(body), SCHEMA)
    # the chosen tokens' logprobs are the model's own (raw): the forced "{" was not its first choice
    assert any(lp[t].rank > 1 for t, lp in zip(c.token_ids[1:], c.logprobs[1:]))


def test_llm_chat_starts_the_grammar_after_think(llm):
    """LLM.chat with a Thinking template: the grammar waits for the model's </think> (as the server);
    the caller's params are not changed; a prompt without an open <think> is constrained at once."""
    tok = llm.tokenizer
    end = tok.token_to_id("</think>")
    params = SamplingParams(temperature=0.0, max_tokens=300, logit_bias={end: 100.0}, structured_outputs=S(json=SCHEMA))
    (out,) = llm.chat([{"role": "user", "content": "Hi"}], params)
    ids = out.outputs[0].token_ids
    assert ids[0] == end and end not in ids[1:] and params.structured_outputs.start_after_token_id is None
    jsonschema.validate(json.loads(tok.decode(ids[1:])), SCHEMA)
    (out,) = llm.chat([{"role": "user", "content": "Hi"}], [params], chat_template="{{ messages[0].content }}")
    assert out.outputs[0].token_ids[0] != end
    jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)


def run(eng, requests: dict) -> dict:
    """Run {request id: (prompt ids, SamplingParams)} on the engine together -> {id: sample 0's ids}."""
    for rid, (ids, params) in requests.items():
        eng.add_request(rid, ids, params)
    got = {rid: [] for rid in requests}
    while eng.has_unfinished_requests():
        for out in eng.step():
            got[out.request_id] += out.outputs[0].token_ids
    return got


def test_unconstrained_rows_unchanged_in_a_mixed_batch(llm):
    eng, tok = llm.llm_engine, llm.tokenizer
    free = (tok.encode("Tell me"), SamplingParams(temperature=1.0, seed=11, max_tokens=24))
    alone = run(eng, {"free": free})["free"]
    got = run(eng, {"free": free, "json": (tok.encode("Hello"), SamplingParams(
        temperature=1.0, seed=5, max_tokens=300, structured_outputs=S(json=SCHEMA)))})
    assert got["free"] == alone
    jsonschema.validate(json.loads(llm.tokenizer.decode(got["json"])), SCHEMA)
    assert not eng.structured.rows  # matchers freed with their sequences


def test_preemption_keeps_the_matchers(llm, tiny_ckpt):
    """A cache too small for all four: sequences are preempted and recomputed; their matchers
    (kept per sequence, not in the cache) carry on, so the outputs equal an unpressed run's."""
    from qwen3next.engine import EngineArgs, LLMEngine
    from tests.test_engine import kv_budget

    model, tok = llm.llm_engine.model, llm.tokenizer
    reqs = {str(i): (tok.encode(p), SamplingParams(temperature=1.0, seed=i, max_tokens=200,
                                                   structured_outputs=S(json=SCHEMA)))
            for i, p in enumerate(["Hello", "Hi there", "The weather", "Tell me"])}
    ref = run(llm.llm_engine, reqs)
    eng = LLMEngine(model, EngineArgs(max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64, block_size=8,
                                      kv_cache_memory_bytes=kv_budget(model, 8, 4, 30)),
                    eos_token_ids=llm.llm_engine.eos_token_ids)
    eng.structured.tokenizer_dir = tiny_ckpt
    got = run(eng, reqs)
    assert eng.scheduler.num_preemptions > 0 and got == ref
    for ids in got.values():
        jsonschema.validate(json.loads(tok.decode(ids)), SCHEMA)


def test_abort_frees_matchers_and_bad_grammars_are_value_errors(llm):
    eng = llm.llm_engine
    ids = llm.tokenizer.encode("Hi")
    eng.add_request("a", ids, SamplingParams(n=3, max_tokens=50, structured_outputs=S(regex="[a-z]+")))
    assert len(eng.structured.rows) == 3
    eng.step()
    eng.abort_request("a")
    assert not eng.structured.rows
    while eng.has_unfinished_requests():
        eng.step()
    for bad in (S(regex="[a-"), S(json={"type": "strin"}), S(grammar="start: nothing_defined"),
                S(json="{not json")):
        with pytest.raises(ValueError, match=rf"^structured_outputs\.{bad.kind}: invalid {bad.kind}"):
            eng.add_request("b", ids, SamplingParams(structured_outputs=bad))
    assert "b" not in eng.requests and not eng.structured.rows
    with pytest.raises(ValueError, match="exactly one"):
        S(regex="a", choice=["a"])


def _spec_engines(model, model_dir, eos, ks):
    """A plain engine and one MTP engine per k over the same float32 model."""
    from qwen3next.engine import EngineArgs, LLMEngine

    out = []
    for k in [None, *ks]:
        spec = {"method": "qwen3_next_mtp", "num_speculative_tokens": k} if k else None
        eng = LLMEngine(model, EngineArgs(max_model_len=512, max_num_seqs=8, speculative_config=spec),
                        eos_token_ids=eos)
        eng.structured.tokenizer_dir = model_dir
        out.append(eng)
    return out


@pytest.fixture(scope="module")
def mtp_model(tiny_ckpt):
    from qwen3next.loader import load_model

    return load_model(tiny_ckpt, dtype=torch.float32, device="cpu", with_mtp=True, progress=False)[0]


def test_speculative_greedy_equals_plain_tiny(tiny_ckpt, llm, mtp_model, monkeypatch):
    """MTP on (k = 2, drafts = the plain run's continuation with planted errors): constrained rows
    (each verify position masked by the grammar after the drafts before it), a row whose grammar
    starts after </think> and a free row in one batch give exactly the plain engine's greedy tokens."""
    from tests.test_spec_decode import ScriptedDrafts, use_drafter

    model, tok = mtp_model, llm.tokenizer
    end = tok.token_to_id("</think>")
    g = dict(temperature=0.0, max_tokens=300)
    reqs = {"free": (tok.encode("Tell me"), SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)),
            "json": (tok.encode("Hello"), SamplingParams(**g, structured_outputs=S(json=SCHEMA))),
            "choice": (tok.encode("Hi"), SamplingParams(**g, structured_outputs=S(choice=["yes", "no", "maybe not"]))),
            "think": (tok.encode("Hi"), SamplingParams(**g, logit_bias={end: 100.0},
                                                       structured_outputs=S(json=SCHEMA, start_after_token_id=end)))}
    plain, spec = _spec_engines(model, tiny_ckpt, llm.llm_engine.eos_token_ids, [2])
    ref = run(plain, reqs)
    use_drafter(monkeypatch, ScriptedDrafts({r: ([t], None) for r, t in ref.items()}))
    assert run(spec, reqs) == ref
    # the free row alone has 29 tokens to accept: most accepted drafts are the grammar rows'
    assert spec.stats["spec_decode"]["num_accepted_tokens"] > 100 and not spec.structured.rows
    jsonschema.validate(json.loads(tok.decode(ref["json"])), SCHEMA)


def test_verify_masks_follow_the_drafts(llm):
    """mask_verify: position j is masked by the grammar after drafts 1..j; the position after an
    invalid draft stays unmasked (never accepted); the matcher ends where it began."""
    eng, tok = llm.llm_engine, llm.tokenizer
    eng.add_request("v", tok.encode("Hi"), SamplingParams(max_tokens=9, structured_outputs=S(choice=["yes", "yo"])))
    seq = eng.requests["v"].seqs[0]
    y, e, s, o = (tok.encode(c)[0] for c in "yeso")
    allowed = lambda row: set(torch.isfinite(row).nonzero().flatten().tolist())  # noqa: E731
    V = eng.vocab_size
    x = eng.structured.mask_verify(torch.zeros(5, V), [seq], [[y, e, o, y]], [0])  # "o" after "ye": invalid
    a = [allowed(r) for r in x[:4]]
    assert a[0] == {y} and {e, o} <= a[1] and y not in a[1] and a[2] == {s} and a[3] == set(range(V))
    assert allowed(eng.structured.mask(torch.zeros(1, V), [seq])[0]) == {y}  # rolled back
    eng.abort_request("v")
    eng.step()


@pytest.mark.parametrize("drafter", ["scripted", "mtp"])
@torch.inference_mode()
def test_speculative_sampling_under_a_grammar_matches_the_target(tiny_ckpt, llm, mtp_model, monkeypatch, drafter):
    """temperature 1, top_k 2, free text until </think> then a choice: the distribution of whole
    outputs under MTP (k = 2) equals the exact target distribution, found by walking every path
    with the engine's own masks (chi-square). Drafts from a drafter that often proposes invalid
    tokens (and </think> mid-draft), or from the MTP head sampled under the grammar's masks."""
    from qwen3next.engine.rejection_sampler import adjusted_logits, final_probs
    from qwen3next.engine.sequence import Request, Sequence
    from qwen3next.engine.structured_output import StructuredOutputs
    from qwen3next.forward_batch import ForwardBatch
    from tests.test_spec_decode import use_drafter

    model, tok = mtp_model, llm.tokenizer
    eos = llm.llm_engine.eos_token_ids
    end, V = tok.token_to_id("</think>"), llm.llm_engine.vocab_size
    prompt, M = tok.encode("Hi"), 4

    def params(n=1):
        return SamplingParams(n=n, temperature=1.0, top_k=2, max_tokens=M, logit_bias={end: 2.0},
                              structured_outputs=S(choice=["ab", "b"], start_after_token_id=end))

    so = StructuredOutputs(V, eos)
    so.tokenizer_dir = tiny_ckpt
    sids = itertools.count()

    def at(path: tuple):
        """A sequence after `path`, its matcher advanced as the engine does -> (seq, grammar stopped)."""
        seq = Sequence(next(sids), Request("x", prompt, params(), eos, len(prompt) + M), 0, torch.device("cpu"))
        so.add([seq.seq_id], params())
        stopped = False
        for t in path:
            seq.token_ids.append(t)
            stopped = so.advance(seq, t)
        return seq, stopped

    exact, support = {}, {}

    def walk(path: tuple, prob: float) -> None:
        seq, _ = at(path)
        x = torch.tensor(seq.token_ids)
        logits = model.compute_logits(model(x, torch.arange(len(x)), ForwardBatch.full([len(x)]))[-1:])
        p = final_probs(adjusted_logits(so.mask(logits, [seq]), [seq], [[]]), [seq])[0]
        so.free(seq.seq_id)
        support[path] = set(torch.nonzero(p).flatten().tolist())
        for t in support[path]:
            q, pq = path + (t,), prob * float(p[t])
            if t in eos or len(q) == M or at(q)[1]:  # the engine's stop rules
                exact[q] = pq
            else:
                walk(q, pq)

    walk((), 1.0)
    assert abs(sum(exact.values()) - 1) < 1e-4 and any(end in p[1:] for p in exact)
    g = torch.Generator().manual_seed(5)

    def scripted(logits, seqs):
        # q: uniform over the target's support plus one token outside it (often rejected)
        toks, probs = [], []
        for s in seqs:
            allowed = sorted(support.get(tuple(s.output_token_ids + s.spec_token_ids), {0})) + [V - 1]
            q = torch.zeros(V)
            q[allowed] = 1.0 / len(allowed)
            toks.append(int(torch.multinomial(q, 1, generator=g)))
            probs.append(q)
        return toks, probs

    if drafter == "scripted":
        use_drafter(monkeypatch, scripted)
    eng = _spec_engines(model, tiny_ckpt, eos, [2])[1]
    N = 1600
    for i in range(N // 16):
        eng.add_request(str(i), prompt, params(16))
    got = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            for c in out.outputs:
                got.setdefault((out.request_id, c.index), []).extend(c.token_ids)
    counts = dict.fromkeys(exact, 0)
    for toks in got.values():
        assert tuple(toks) in counts, f"{toks} has probability 0 under the target"
        counts[tuple(toks)] += 1
    st = eng.stats["spec_decode"]
    assert (0.05 if drafter == "mtp" else 0.1) < st["acceptance_rate"] < 0.9, st  # accepts and rejects
    stat = sum((counts[p] - N * e) ** 2 / (N * e) for p, e in exact.items())
    df = len(exact) - 1
    assert stat < df + 4 * math.sqrt(2 * df), (stat, df, len(exact))


DEMO = os.path.join(os.path.dirname(__file__), "..", "qwen3next", "demo_model")


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEMO, "model.safetensors")), reason="demo model not built")
def test_speculative_greedy_equals_plain_demo_model(monkeypatch):
    """The demo model's own MTP head: a JSON schema, a choice, a schema that starts after the
    model's own </think> (drafted past) and a free row, k = 1..3, and under preemption; the grammar
    rows' drafts are valid in their grammar (drafted under its mask)."""
    from tokenizers import Tokenizer

    from qwen3next.engine.mtp_proposer import MTPProposer
    from qwen3next.loader import load_model

    model, _ = load_model(DEMO, dtype=torch.float32, device="cpu", with_mtp=True, progress=False)
    tok = Tokenizer.from_file(os.path.join(DEMO, "tokenizer.json"))
    end = tok.token_to_id("</think>")
    schema = {"type": "object", "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}}}
    reqs = {r: (tok.encode(p).ids, SamplingParams(temperature=0.0, **kw)) for r, p, kw in [
        ("free", "Once upon a time", dict(max_tokens=40, ignore_eos=True)),
        ("json", "The user is", dict(max_tokens=60, structured_outputs=S(json=schema))),
        ("choice", "Is it good?", dict(max_tokens=10, structured_outputs=S(choice=["yes", "no", "maybe"]))),
        ("think", "Once upon a time", dict(max_tokens=90, structured_outputs=S(json=schema, start_after_token_id=end)))]}
    plain, *specs = _spec_engines(model, DEMO, [], [1, 2, 3])
    ref = run(plain, reqs)
    valid, propose = [], MTPProposer.run

    def checked(self, entries, hidden):  # are the drafts of grammar rows all valid in their grammar?
        propose(self, entries, hidden)
        for seq, *_ in entries:
            m = self.structured.active_matcher(seq)
            if m is not None and seq.spec_token_ids:
                valid.append(m.validate_tokens(seq.spec_token_ids) == len(seq.spec_token_ids))

    monkeypatch.setattr(MTPProposer, "run", checked)
    think = tok.decode(ref["think"], skip_special_tokens=False)
    assert "</think>" in think and json.loads(think.split("</think>")[1])["age"] is not None
    for eng in specs:
        assert run(eng, reqs) == ref
        assert eng.stats["spec_decode"]["acceptance_rate"] > 0.2
    assert valid and all(valid)  # the grammar rows' drafts were drafted under their masks
    # a cache of 112 tokens and a 16-token budget: preempted and recomputed, matchers carry on
    from qwen3next.engine import EngineArgs, LLMEngine
    from tests.test_spec_decode import kv_budget

    spec = {"method": "qwen3_next_mtp", "num_speculative_tokens": 2}
    eng = LLMEngine(model, EngineArgs(max_model_len=256, max_num_seqs=3, max_num_batched_tokens=16, block_size=4,
                                      kv_cache_memory_bytes=kv_budget(model, 2, 4, 3, 28), speculative_config=spec),
                    eos_token_ids=[])
    eng.structured.tokenizer_dir = DEMO
    assert run(eng, reqs) == ref and eng.scheduler.num_preemptions > 0


def test_without_llguidance_a_clear_error(monkeypatch):
    import builtins

    from qwen3next.engine import structured_output

    real = builtins.__import__

    def no_llg(name, *a, **kw):
        if name == "llguidance":
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_llg)
    with pytest.raises(ValueError, match="llguidance package"):
        structured_output.grammar_of(S(json_object=True))
    assert not structured_output.available()


# ---- the server's request parsing (no engine) ----

def _parse(**kw):
    from qwen3next.api.protocol import ChatCompletionRequest
    from qwen3next.api.structured import structured_outputs
    from qwen3next.api.validate import parse_body

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    return structured_outputs(parse_body(json.dumps(body).encode(), ChatCompletionRequest), 99)


def test_request_fields_map_to_params():
    assert _parse() is None and _parse(response_format={"type": "text"}) is None
    so = _parse(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA,
                                                                         "strict": True}})
    assert so.json == SCHEMA and so.start_after_token_id == 99
    assert _parse(response_format={"type": "json_object"}).json_object
    assert _parse(response_format={"type": "json_schema", "json_schema": {"name": "x"}}).json_object
    assert _parse(guided_json=json.dumps(SCHEMA)).json == json.dumps(SCHEMA)
    assert _parse(guided_regex="a+").regex == "a+"
    assert _parse(guided_choice=["a", "b"]).choice == ["a", "b"]
    assert _parse(guided_grammar='start: "a" | "b"').grammar
    so = _parse(structured_outputs={"json": SCHEMA, "disable_any_whitespace": True})
    assert so.json == SCHEMA and so.disable_any_whitespace


@pytest.mark.parametrize("kw,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": "{oops"}, "guided_json"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"structured_outputs": {"regex": "(("}}, "structured_outputs.regex"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
])
def test_bad_requests_are_400_naming_the_field(kw, param):
    from qwen3next.api.errors import APIError

    with pytest.raises(APIError) as e:
        _parse(**kw)
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_packed_mask_helpers():
    from qwen3next.engine.structured_output import set_bits, unpack_bits, unpack_bits_numpy

    rng = np.random.default_rng(0)
    bits = rng.integers(-2**31, 2**31, size=(3, 5), dtype=np.int64).astype(np.int32)
    V = 150
    ref = np.array([[(int(bits[r, t // 32]) >> (t % 32)) & 1 for t in range(V)] for r in range(3)], dtype=bool)
    assert (unpack_bits_numpy(bits, V) == ref).all()
    assert (unpack_bits(torch.from_numpy(bits), V).numpy() == ref).all()  # the device path, on CPU
    set_bits(bits[1], [0, 31, 31, 63, 149], True)
    set_bits(bits[2], [5, 32, 31], False)
    got = unpack_bits_numpy(bits, V)
    assert got[1, [0, 31, 63, 149]].all() and not got[2, [5, 32, 31]].any()
    ref[1, [0, 31, 63, 149]] = True
    ref[2, [5, 32, 31]] = False
    assert (got == ref).all()
