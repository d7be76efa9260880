"""Training: data, masks, tokenizer, losses, optimizer groups, schedule, checkpoints, resume,
transformers parity of a saved dir. Everything runs on a tiny model (a few seconds)."""

from __future__ import annotations

import json
import os
import random
import re

import pytest
import torch

from qwen3next.chat_template import builtin_template
from qwen3next.forward_batch import ForwardBatch
from qwen3next.loader import load_model
from qwen3next.tokenizer import QWEN3_ADDED_TOKENS
from qwen3next.train import trainer
from qwen3next.train.data import add_reasoning, generate, sub_reasoning
from qwen3next.train.encode import assistant_spans, encode_conversations, encode_text, render
from qwen3next.train.losses import load_balancing_loss, model_losses, shift_targets
from qwen3next.train.presets import preset_config
from qwen3next.train.tokenizer_train import train_tokenizer, write_tokenizer_files


@pytest.fixture(scope="session")
def convs():
    return generate(120, seed=7)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, convs):
    d = str(tmp_path_factory.mktemp("tok"))
    write_tokenizer_files(train_tokenizer([render(c) for c in convs], 600), d)
    return d


@pytest.fixture(scope="session")
def tok(tok_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))


@pytest.fixture(scope="session")
def examples(convs, tok):
    return encode_conversations(convs, tok, max_len=512)


def tiny_model(tok, seed=0):
    cfg = preset_config("tiny", tok.get_vocab_size(), tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>"))
    return trainer.build_model(cfg, seed)


def batch_of(examples, k=6):
    return trainer.to_tensors(examples[:k])


# ---- data and masks --------------------------------------------------------------------------
def test_data_is_deterministic_by_seed():
    a, b, c = generate(30, 1), generate(30, 1), generate(30, 2)
    assert [x.messages for x in a] == [x.messages for x in b]
    assert [x.messages for x in a] != [x.messages for x in c]
    assert {x.family for x in generate(200, 3)} == {"arith", "tool", "plain"}


def test_arithmetic_reasoning_is_right():
    rng = random.Random(0)
    for _ in range(300):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        add, sub = add_reasoning(a, b), sub_reasoning(a, b)
        assert add.endswith(f"So {a} + {b} = {a + b}.")
        assert sub.endswith(f"So {a} - {b} = {a - b}.")
        # the last "So far" of the column walk spells the magnitude of the result
        assert int(re.findall(r"So far: (\d+)", add)[-1]) == a + b
        assert int(re.findall(r"So far: (\d+)", sub)[-1]) == abs(a - b)


def test_mask_covers_exactly_the_assistant_turns(convs, tok):
    tool_conv = next(c for c in convs if c.family == "tool")
    text = render(tool_conv)
    ids, mask = encode_text(text, tok)
    spans = assistant_spans(text)
    assert len(spans) == 2  # the tool-call turn and the final answer
    masked = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert masked == "".join(text[s:e] for s, e in spans)
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
    assert tool_conv.messages[0]["content"] in unmasked and "<tool_response>" in unmasked
    assert "<tool_response>" not in masked and "# Tools" not in masked
    assert masked.count("<|im_end|>") == 2 and "<tool_call>" in masked and "</think>" in masked


# ---- tokenizer ---------------------------------------------------------------------------------
def test_tokenizer_added_tokens_and_digits(tok, tok_dir):
    n = tok.get_vocab_size(with_added_tokens=False)
    decoder = tok.get_added_tokens_decoder()
    for i, (content, special) in enumerate(QWEN3_ADDED_TOKENS):
        assert tok.token_to_id(content) == n + i
        assert decoder[n + i].special == special and not decoder[n + i].normalized
    assert len(tok.encode("12345", add_special_tokens=False).ids) == 5
    cfg = json.load(open(os.path.join(tok_dir, "tokenizer_config.json")))
    assert cfg["chat_template"] == builtin_template("qwen3_next_thinking")
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>" and cfg["bos_token"] is None
    enc = tok.encode("<|im_start|>user\nHi<think></think><|im_end|>", add_special_tokens=False)
    assert tok.token_to_id("<think>") in enc.ids and tok.token_to_id("<|im_end|>") == enc.ids[-1]


# ---- losses ------------------------------------------------------------------------------------
def test_shift_targets_stay_inside_sequences():
    ids = torch.arange(10)
    mask = torch.ones(10, dtype=torch.bool)
    cu = torch.tensor([0, 4, 10])
    t1, v1 = shift_targets(ids, mask, cu, 1)
    assert v1.tolist() == [1, 1, 1, 0, 1, 1, 1, 1, 1, 0] and t1[:3].tolist() == [1, 2, 3]
    _, v2 = shift_targets(ids, mask, cu, 2)
    assert v2.tolist() == [1, 1, 0, 0, 1, 1, 1, 1, 0, 0]


def test_load_balancing_loss_values():
    E, T = 4, 64
    uniform = torch.zeros(T, E)
    assert load_balancing_loss([uniform], 2).item() == pytest.approx(1.0)
    collapsed = torch.zeros(T, E)
    collapsed[:, 0] = 20.0  # every token prefers expert 0 (and, second, a tie at 1)
    assert load_balancing_loss([collapsed], 2).item() > 1.9


def test_losses_present_finite_and_decrease(examples, tok, tmp_path):
    model = tiny_model(tok)
    ids, mask, pos, fb = batch_of(examples)
    out = model_losses(model, ids, mask, pos, fb, mtp_weight=0.3, aux_coef=0.01)
    assert {"loss", "lm", "mtp", "aux"} <= set(out) and all(torch.isfinite(v) for v in out.values())
    args = trainer.TrainArgs(out_dir=str(tmp_path), steps=12, lr=1e-2, warmup_steps=2)
    opt = trainer.make_optimizer(model, args)
    first = None
    for _ in range(12):
        out = model_losses(model, ids, mask, pos, fb, 0.3, 0.01)
        first = first or {k: float(v.detach()) for k, v in out.items()}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    last = {k: float(v.detach()) for k, v in out.items()}
    assert last["lm"] < first["lm"] - 0.5 and last["mtp"] < first["mtp"] - 0.5


def test_no_decay_groups(tok):
    model = tiny_model(tok)
    names = {n for n, _ in model.named_parameters()}
    kept = {n for n in names if trainer.no_decay(n)}
    assert kept and all(n.endswith(("A_log", "dt_bias", "linear_attn.norm.weight")) for n in kept)
    assert "model.norm.weight" not in kept and "mtp.pre_fc_norm_hidden.weight" not in kept


def test_lr_schedule():
    a = trainer.TrainArgs(out_dir="x", steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert trainer.lr_factor(0, a) == pytest.approx(0.1) and trainer.lr_factor(9, a) == pytest.approx(1.0)
    assert trainer.lr_factor(10, a) == pytest.approx(1.0) and trainer.lr_factor(100, a) == pytest.approx(0.1)
    assert trainer.lr_factor(55, a) == pytest.approx(0.55)


# ---- checkpoints and resume --------------------------------------------------------------------
@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, examples, tok, tok_dir):
    out = str(tmp_path_factory.mktemp("run"))
    model = tiny_model(tok)
    trainer.train(model, tok_dir, examples, trainer.TrainArgs(out_dir=out, steps=3, batch_tokens=1024,
                                                              warmup_steps=1, progress=False))  # fmt: skip
    return out, model


def _logits(model, ids):
    n = len(ids)
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), ForwardBatch.full([n])))


def test_saved_dir_reloads_with_identical_logits(trained_dir, examples):
    out, model = trained_dir
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", trainer.STATE_FILE} <= names  # fmt: skip
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "mtp.fc.weight" in keys and "model.layers.0.mlp.experts.3.down_proj.weight" in keys
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "qwen3_next"
    reloaded, _ = load_model(out, dtype=torch.float32, progress=False)
    model.eval()
    ids = examples[0].ids
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))


def test_transformers_loads_saved_dir_with_same_logits(trained_dir, examples):
    transformers = pytest.importorskip("transformers")
    out, model = trained_dir
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = examples[1].ids
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(theirs, _logits(model.eval(), ids), atol=1e-4, rtol=1e-4)


class _Killed(Exception):
    pass


def test_resume_continues_exactly(examples, tok, tok_dir, tmp_path, monkeypatch):
    args = lambda out: trainer.TrainArgs(out_dir=out, steps=4, batch_tokens=1024, warmup_steps=1,  # noqa: E731
                                         save_every=2, progress=False)
    straight = tiny_model(tok)
    trainer.train(straight, tok_dir, examples, args(str(tmp_path / "a")))

    save_state = trainer.save_state

    def save_then_die(path, model, opt, step, a):
        save_state(path, model, opt, step, a)
        raise _Killed  # the process dies right after the step-2 checkpoint

    out = str(tmp_path / "b")
    monkeypatch.setattr(trainer, "save_state", save_then_die)
    with pytest.raises(_Killed):
        trainer.train(tiny_model(tok), tok_dir, examples, args(out))
    monkeypatch.setattr(trainer, "save_state", save_state)
    resumed = tiny_model(tok, seed=123)  # a fresh process: other init, everything comes from the state
    trainer.train(resumed, tok_dir, examples, args(out), resume=True)
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, trainer.LOG_FILE))]
    assert steps == [1, 2, 3, 4]


# ---- eval grading ------------------------------------------------------------------------------
def test_eval_graders():
    from qwen3next.train.eval import arith_correct, final_answer_correct, split_output, tool_call_grade

    reasoning, content = split_output("Add 1 and 2.\nSo 1 + 2 = 3.\n</think>\n\n1 + 2 = 3.")
    assert reasoning.startswith("Add") and content == "1 + 2 = 3."
    assert arith_correct(content, 3) and not arith_correct(content, 2) and arith_correct("5 - 9 = -4.", -4)
    assert split_output("no end of thinking") == ("no end of thinking", "")
    call = '<tool_call>\n{"name": "get_time", "arguments": {"city": "New York"}}\n</tool_call>'
    assert tool_call_grade(call, "get_time", "New York") == (True, True)
    assert tool_call_grade(call, "get_weather", "New York") == (True, False)
    assert tool_call_grade(call.replace("}}", "}"), "get_time", "New York") == (False, False)
    assert tool_call_grade("It is sunny.", "get_time", "Rome") == (False, False)
    weather = {"city": "Rome", "temperature_c": -3, "condition": "snowy"}
    assert final_answer_correct("It is currently snowy in Rome with a temperature of -3 degrees Celsius.", weather)
    assert not final_answer_correct("It is currently snowy in Rome with a temperature of 3 degrees.", weather)
    assert not final_answer_correct("snowy in Rome, 13 degrees", {**weather, "temperature_c": 3})
    assert not final_answer_correct("snowy in Rome, -3 degrees", {**weather, "temperature_c": 3})
    assert final_answer_correct("The current local time in Oslo is 07:05.", {"city": "Oslo", "time": "07:05"})
