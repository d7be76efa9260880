"""Audit (session 5): `qwen3next train` / `qwen3next eval` refuse bad input at once with one line,
before any data, tokenizer or model setup, and never overwrite a finished run silently."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from qwen3next.cli import main as cli_main
from qwen3next.train import trainer
from qwen3next.train.cli import main as train_main
from qwen3next.train.presets import preset_config


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("flag,value", [
    ("--steps", "-1"), ("--steps", "0"), ("--batch-tokens", "0"), ("--lr", "nan"), ("--lr", "-1"),
    ("--grad-clip", "0"), ("--weight-decay", "-0.1"), ("--warmup-steps", "-3"), ("--min-lr-ratio", "2"),
    ("--mtp-weight", "-1"), ("--aux-coef", "-1"), ("--save-every", "-1"), ("--threads", "0"),
    ("--num-conversations", "0"), ("--max-len", "0"),
])  # fmt: skip
def test_train_refuses_bad_numbers_at_once(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    t0 = time.time()
    assert cli_main(["train", "--out", str(out), "--no-progress", flag, value]) == 1
    assert time.time() - t0 < 3  # not after ~10 s of data and tokenizer setup
    assert flag in _one_error_line(capsys)
    assert not out.exists()  # nothing written for a refused run


def test_train_refuses_missing_tokenizer_and_init(tmp_path, capsys):
    assert cli_main(["train", "--out", str(tmp_path / "r"), "--tokenizer", str(tmp_path / "none")]) == 1
    assert "--tokenizer" in _one_error_line(capsys)
    assert cli_main(["train", "--out", str(tmp_path / "r"), "--init", str(tmp_path)]) == 1
    assert "--init" in _one_error_line(capsys)


def test_train_will_not_overwrite_a_run_without_resume(tmp_path, capsys):
    (tmp_path / "training_state.pt").write_bytes(b"x")
    assert cli_main(["train", "--out", str(tmp_path), "--steps", "5"]) == 1
    assert "--resume" in _one_error_line(capsys)
    assert (tmp_path / "training_state.pt").read_bytes() == b"x"


def test_resume_of_a_finished_run_says_so(tmp_path, capsys):
    model = trainer.build_model(preset_config("tiny", 300, 0, 1), 0)
    args = trainer.TrainArgs(out_dir=str(tmp_path), steps=3, progress=False)
    opt = trainer.make_optimizer(model, args)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # as train() does: records initial_lr
    trainer.save_state(str(tmp_path / trainer.STATE_FILE), model, opt, 3, args)
    # a no-op with one line (make_demo_model.sh with RESUME=1 passes a finished phase 1 this way)
    assert trainer.train(model, str(tmp_path), [], args, resume=True) == {"step": 3}
    assert "already at step 3 of 3" in capsys.readouterr().err


def test_standalone_train_cli_prints_one_line(tmp_path, capsys):
    assert train_main(["train", "--out", str(tmp_path / "r"), "--steps", "-1"]) == 1
    assert "--steps" in _one_error_line(capsys)


def test_eval_bad_path_and_bad_flags(tmp_path, capsys):
    assert cli_main(["eval", str(tmp_path / "nope")]) == 1
    assert "is not a directory" in _one_error_line(capsys)
    for args in (["--n", "0"], ["--batch-size", "0"], ["--json", str(tmp_path / "no" / "x.json")]):
        assert cli_main(["eval", *args]) == 1
        assert args[0] in _one_error_line(capsys)


def test_resume_with_another_model_is_one_line(tmp_path):
    small = trainer.build_model(preset_config("tiny", 300, 0, 1), 0)
    args = trainer.TrainArgs(out_dir=str(tmp_path), steps=3, progress=False)
    opt = trainer.make_optimizer(small, args)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trainer.save_state(str(tmp_path / trainer.STATE_FILE), small, opt, 1, args)
    other = trainer.build_model(preset_config("tiny", 400, 0, 1), 0)  # another vocabulary
    with pytest.raises(ValueError, match="holds another model") as e:
        trainer.train(other, str(tmp_path), [], args, resume=True)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("mix", ["arith=nan", "arith=inf,tool=1", "arith=-1"])
def test_mix_weights_must_be_finite(tmp_path, capsys, mix):
    assert cli_main(["train", "--out", str(tmp_path / "r"), "--mix", mix]) == 1
    assert "mix: weight of 'arith'" in _one_error_line(capsys)


def test_tiny_run_end_to_end_resumes_and_loads_back(tmp_path, capsys):
    from qwen3next import LLM, SamplingParams
    from qwen3next.train.cli import default_model_dir

    out = str(tmp_path / "run")
    base = ["train", "--out", out, "--preset", "tiny", "--tokenizer", default_model_dir(), "--num-conversations",
            "60", "--batch-tokens", "512", "--no-progress", "--save-dtype", "bfloat16"]  # fmt: skip
    assert cli_main([*base, "--steps", "2"]) == 0
    assert cli_main([*base, "--steps", "3", "--resume"]) == 0
    with open(os.path.join(out, trainer.LOG_FILE)) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    capsys.readouterr()
    assert cli_main(["generate", "--model", out, "--prompt", "Hi", "--max-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()
    res = LLM(out, max_model_len=128).generate("Hi", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(res[0].outputs[0].token_ids) == 3


def test_init_with_a_larger_tokenizer_refused(tmp_path, capsys):
    from qwen3next.loader import save_checkpoint
    from qwen3next.train.cli import default_model_dir

    init = str(tmp_path / "init")
    save_checkpoint(trainer.build_model(preset_config("tiny", 300, 0, 1), 0), init)
    out = tmp_path / "run"
    assert cli_main(["train", "--out", str(out), "--init", init, "--tokenizer", default_model_dir()]) == 1
    assert "has 1110 tokens but the --init model's vocab_size is" in _one_error_line(capsys)
    assert not out.exists()


def test_balance_loss_reaches_every_router_and_mtp_loss_the_mtp_head():
    from qwen3next.forward_batch import ForwardBatch
    from qwen3next.train.losses import model_losses

    model = trainer.build_model(preset_config("tiny", 300, 0, 1), 0).train()
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(12), torch.arange(8)])
    out = model_losses(model, ids, torch.ones(20, dtype=torch.bool), positions, ForwardBatch.full([12, 8]), 0.3, 0.01)
    assert float(out["loss"]) == pytest.approx(float(out["lm"] + 0.3 * out["mtp"] + 0.01 * out["aux"]), rel=1e-6)
    out["aux"].backward(retain_graph=True)
    routers = [n for n, _ in model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert any(n.startswith("mtp.") for n in routers)
    grads = dict(model.named_parameters())
    assert all(grads[n].grad is not None and grads[n].grad.abs().sum() > 0 for n in routers)
    model.zero_grad()
    out["mtp"].backward()
    assert grads["mtp.fc.weight"].grad.abs().sum() > 0 and grads["model.norm.weight"].grad is not None
