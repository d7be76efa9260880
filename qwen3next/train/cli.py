"""`qwen3next train` and `qwen3next eval`: argument parsing and the glue between data, tokenizer,
model and loop. `add_subcommands(subparsers)` registers both verbs on the main CLI's parser;
`python -m qwen3next.train.cli train|eval ...` runs them standalone.

train: synthetic chats (seeded) -> tokenizer (trained here unless given) -> model (a preset from
scratch, or --init DIR to continue from an HF dir) -> loop -> HF model dir in --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from qwen3next.train.presets import PRESETS

_TRAIN_DEFAULTS = {"vocab_size": 2000, "tokenizer_conversations": 5000}


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on the synthetic chat tasks (CPU/GPU)",
                       description="Train a Qwen3-Next model on synthetic chat data; writes an HF model dir.")  # fmt: skip
    p.add_argument("--out", required=True, help="run / output directory (HF model dir + training_state.pt)")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="model size when training from scratch")
    p.add_argument("--init", default=None, help="continue from this HF model dir (uses its tokenizer)")
    p.add_argument("--tokenizer", default=None, help="dir with tokenizer.json + tokenizer_config.json (default: train one)")
    p.add_argument("--vocab-size", type=int, default=_TRAIN_DEFAULTS["vocab_size"],
                   help="BPE size when training the tokenizer (regular tokens, before the 26 added ones)")  # fmt: skip
    p.add_argument("--num-conversations", type=int, default=20000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--mix", default=None, help="family weights, e.g. arith=0.5,tool=0.3,plain=0.2 (the default)")
    p.add_argument("--max-len", type=int, default=512, help="drop conversations longer than this (tokens)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--aux-coef", type=float, default=None, help="router balance loss weight (default: config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue from --out/training_state.pt")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a model on freshly drawn synthetic tasks",
                       description="Arithmetic accuracy, tool-call rate/correctness, answers after tool "
                                   "responses, MTP agreement, on prompts drawn with a fresh seed.")  # fmt: skip
    p.add_argument("model", nargs="?", default=None, help="HF model dir (default: the shipped demo model)")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--n", type=int, default=100, help="prompts per task")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=run_eval)


def add_subcommands(subparsers) -> None:
    """Register `train` and `eval` on an argparse subparsers object."""
    _add_train(subparsers)
    _add_eval(subparsers)


# (field, lowest allowed value, whether the lowest is allowed): checked before any data setup
_TRAIN_BOUNDS = [
    ("steps", 1, True), ("batch_tokens", 1, True), ("num_conversations", 1, True), ("max_len", 1, True),
    ("lr", 0.0, False), ("min_lr_ratio", 0.0, True), ("warmup_steps", 0, True), ("weight_decay", 0.0, True),
    ("grad_clip", 0.0, False), ("mtp_weight", 0.0, True), ("aux_coef", 0.0, True), ("save_every", 0, True),
    ("threads", 1, True),
]


def check_train_args(ns) -> None:
    """Refuse bad numbers at once (one line naming the flag), not after the data and tokenizer setup."""
    for field, low, inclusive in _TRAIN_BOUNDS:
        v = getattr(ns, field)
        if v is None:
            continue
        # `not (v >= low)` also refuses NaN
        if not (v >= low if inclusive else v > low) or v == float("inf"):
            rel = ">=" if inclusive else ">"
            raise ValueError(f"--{field.replace('_', '-')} must be {rel} {low}, got {v}")
    if ns.min_lr_ratio > 1:
        raise ValueError(f"--min-lr-ratio must be <= 1, got {ns.min_lr_ratio}")
    if ns.tokenizer is not None and not os.path.isfile(os.path.join(ns.tokenizer, "tokenizer.json")):
        raise ValueError(f"--tokenizer {ns.tokenizer!r}: no tokenizer.json there")
    if ns.init is not None:
        from qwen3next.loader import resolve_model_dir

        ns.init = resolve_model_dir(ns.init)  # a hub id is fetched now, before the data setup
        if not os.path.isfile(os.path.join(ns.init, "config.json")):
            raise ValueError(f"--init {ns.init!r}: no config.json there (an HF model dir is needed)")
        if ns.tokenizer is not None:
            import json

            from tokenizers import Tokenizer

            n_tok = Tokenizer.from_file(os.path.join(ns.tokenizer, "tokenizer.json")).get_vocab_size()
            with open(os.path.join(ns.init, "config.json"), encoding="utf-8") as f:
                n_model = json.load(f).get("vocab_size")
            # ids past the embedding would fail mid-step as torch's "index out of range in self"
            if isinstance(n_model, int) and n_tok > n_model:
                raise ValueError(f"--tokenizer {ns.tokenizer!r} has {n_tok} tokens but the --init model's "
                                 f"vocab_size is {n_model}")  # fmt: skip
    held = [f for f in ("training_state.pt", "model.safetensors") if os.path.isfile(os.path.join(ns.out, f))]
    if held and not ns.resume:
        # a rerun must not silently overwrite a trained model and its optimizer state
        raise ValueError(f"--out {ns.out!r} already holds a training run ({held[0]}); pass --resume to "
                         f"continue it, or remove it / pick another --out to start over")  # fmt: skip
    if ns.mix:
        from qwen3next.train.data import parse_mix

        parse_mix(ns.mix)


def run_train(ns) -> int:
    check_train_args(ns)
    import torch

    from qwen3next.train import trainer
    from qwen3next.train.data import generate, parse_mix
    from qwen3next.train.encode import encode_conversations, render

    if ns.threads:
        torch.set_num_threads(ns.threads)
    t0 = time.time()
    os.makedirs(ns.out, exist_ok=True)
    convs = generate(ns.num_conversations, ns.data_seed, parse_mix(ns.mix) if ns.mix else None)
    if ns.init:
        from qwen3next.loader import load_model

        tok_dir = ns.tokenizer or ns.init
        model, _ = load_model(ns.init, dtype=torch.float32, progress=False)
    else:
        tok_dir = ns.tokenizer or ns.out
        if ns.tokenizer is None and not (ns.resume and os.path.isfile(os.path.join(ns.out, "tokenizer.json"))):
            from qwen3next.train.tokenizer_train import train_tokenizer, write_tokenizer_files

            texts = [render(c) for c in convs[: _TRAIN_DEFAULTS["tokenizer_conversations"]]]
            write_tokenizer_files(train_tokenizer(texts, ns.vocab_size), ns.out)
    from tokenizers import Tokenizer

    from qwen3next.train.presets import preset_config

    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    if not ns.init:
        pad, eos = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
        model = trainer.build_model(preset_config(ns.preset, tok.get_vocab_size(), pad, eos), ns.seed)
    model.train()
    examples = encode_conversations(convs, tok, ns.max_len)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{len(examples)} conversations ({sum(len(e.ids) for e in examples)} tokens), vocab "
          f"{tok.get_vocab_size()}, model {n_params / 1e6:.2f}M parameters; setup {time.time() - t0:.1f}s",
          file=sys.stderr)  # fmt: skip
    args = trainer.TrainArgs(
        out_dir=ns.out, steps=ns.steps, batch_tokens=ns.batch_tokens, lr=ns.lr, min_lr_ratio=ns.min_lr_ratio,
        warmup_steps=ns.warmup_steps, weight_decay=ns.weight_decay, grad_clip=ns.grad_clip,
        mtp_weight=ns.mtp_weight, aux_coef=ns.aux_coef, seed=ns.seed, save_every=ns.save_every,
        save_dtype=ns.save_dtype, progress=not ns.no_progress,
    )  # fmt: skip
    metrics = trainer.train(model, tok_dir, examples, args, resume=ns.resume)
    print(f"done in {time.time() - t0:.0f}s: {metrics}", file=sys.stderr)
    return 0


def run_eval(ns) -> int:
    for field in ("n", "batch_size", "threads"):
        v = getattr(ns, field)
        if v is not None and v < 1:
            raise ValueError(f"--{field.replace('_', '-')} must be >= 1, got {v}")
    if ns.json and not os.path.isdir(os.path.dirname(os.path.abspath(ns.json))):
        raise ValueError(f"--json {ns.json!r}: its directory does not exist")
    import json

    import torch

    from qwen3next.train.eval import evaluate, format_report

    if ns.threads:
        torch.set_num_threads(ns.threads)
    path = ns.model or default_model_dir()
    report = evaluate(path, n=ns.n, seed=ns.seed, batch_size=ns.batch_size, dtype=getattr(torch, ns.dtype))
    print(format_report(report))
    if ns.json:
        with open(ns.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


def default_model_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen3next.train.cli")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    try:
        return int(ns.func(ns) or 0)
    except Exception as e:  # noqa: BLE001 - as the main CLI: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
