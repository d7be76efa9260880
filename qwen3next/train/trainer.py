"""The training loop: AdamW + warm-up/cosine schedule + grad clipping over packed chat batches,
HF-format checkpoints, and exact resume from a training-state file.

A run directory holds the model as an HF dir (config.json, model.safetensors with official names
incl. mtp.*, tokenizer.json, tokenizer_config.json with the Thinking template,
generation_config.json) plus `training_state.pt` (fp32 weights, optimizer, scheduler, step, RNG)
and `train_log.jsonl` (one line of metrics per step).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from qwen3next.config import ModelConfig
from qwen3next.forward_batch import ForwardBatch
from qwen3next.loader import save_checkpoint
from qwen3next.model import Qwen3NextForCausalLM
from qwen3next.train.encode import Example, pack_batches
from qwen3next.train.losses import model_losses

STATE_FILE = "training_state.pt"
LOG_FILE = "train_log.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class TrainArgs:
    out_dir: str
    steps: int = 1000
    batch_tokens: int = 4096
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mtp_weight: float = 0.3
    aux_coef: float | None = None  # None: the config's router_aux_loss_coef
    seed: int = 0
    save_every: int = 0  # 0: only at the end
    save_dtype: str = "float32"
    progress: bool = True


# ---- optimizer -----------------------------------------------------------------------------
def no_decay(name: str) -> bool:
    """Parameters kept out of weight decay.

    Decayed: every matrix (embeddings, lm_head, projections, conv, routers, experts) and the
    zero-centred RMSNorm weights, where decay pulls the stored w toward 0, i.e. the scale 1 + w
    toward 1 (the model card's weight-decayed layernorm). Not decayed: the DeltaNet scalars
    A_log and dt_bias (decay would bias the forget rates) and the gated norm `linear_attn.norm`,
    whose plain weight is centred at 1, so decay would shrink it toward 0.
    """
    return name.endswith(("A_log", "dt_bias", "linear_attn.norm.weight"))


def make_optimizer(model: torch.nn.Module, args: TrainArgs) -> torch.optim.AdamW:
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if no_decay(name) else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8)


def lr_factor(step: int, args: TrainArgs) -> float:
    """Linear warm-up to 1, then cosine down to min_lr_ratio at the last step."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    span = max(1, args.steps - args.warmup_steps)
    progress = min(1.0, (step - args.warmup_steps) / span)
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- batches -------------------------------------------------------------------------------
def batch_stream(examples: list[Example], batch_tokens: int, seed: int, start_step: int):
    """Endless batches: epoch e is a shuffle with Random(seed, e); resuming skips start_step."""
    if not examples:
        raise ValueError("no training examples (all longer than max_len?)")
    step, epoch = 0, 0
    while True:
        for b in pack_batches(examples, batch_tokens, random.Random(f"{seed}-{epoch}")):
            if step >= start_step:
                yield b
            step += 1
        epoch += 1


def to_tensors(batch: list[Example]):
    """-> input_ids [T], loss_mask [T], positions [T], ForwardBatch of the packed sequences."""
    lens = [len(ex.ids) for ex in batch]
    ids = torch.tensor([t for ex in batch for t in ex.ids], dtype=torch.long)
    mask = torch.tensor([m for ex in batch for m in ex.mask], dtype=torch.bool)
    positions = torch.cat([torch.arange(n) for n in lens])
    return ids, mask, positions, ForwardBatch.full(lens)


# ---- checkpoints ---------------------------------------------------------------------------
def generation_config(cfg: ModelConfig) -> dict:
    """Qwen3 Thinking defaults (chat_format.md §6) with this vocabulary's ids."""
    return {
        "bos_token_id": cfg.bos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": [*cfg.eos_token_id, cfg.pad_token_id],
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
    }


def save_model_dir(model: Qwen3NextForCausalLM, tokenizer_dir: str, out_dir: str, dtype: str = "float32") -> None:
    """Write an HF model dir: config.json, model.safetensors (official names, per-expert, mtp.*),
    tokenizer files, generation_config.json."""
    os.makedirs(out_dir, exist_ok=True)
    save_checkpoint(model, out_dir, dtype=getattr(torch, dtype))
    for name in TOKENIZER_FILES:
        src, dst = os.path.join(tokenizer_dir, name), os.path.join(out_dir, name)
        if os.path.abspath(src) != os.path.abspath(dst):
            shutil.copyfile(src, dst)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation_config(model.config), f, indent=2)
        f.write("\n")


def save_state(path: str, model, opt, step: int, args: TrainArgs) -> None:
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "args": asdict(args),
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a half-written state behind


def load_state(path: str, model, opt) -> int:
    state = torch.load(path, map_location="cpu", weights_only=False)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # torch lists every mismatch over many lines: keep the first
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        first = first if len(first) <= 160 else first[:160] + " ..."
        raise ValueError(f"{path} holds another model than the one built now ({first}); resume with "
                         f"the run's own --preset / --init") from None  # fmt: skip
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return int(state["step"])


def _open_log(path: str, start: int):
    """The metrics log, keeping only the lines of steps <= start (a resumed run rewrites the rest)."""
    kept = []
    if start and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
    log = open(path, "w", encoding="utf-8")
    log.writelines(kept)
    return log


# ---- the loop ------------------------------------------------------------------------------
def build_model(hf_config: dict, seed: int) -> Qwen3NextForCausalLM:
    torch.manual_seed(seed)
    return Qwen3NextForCausalLM(ModelConfig.from_hf(hf_config))


def train(model: Qwen3NextForCausalLM, tokenizer_dir: str, examples: list[Example],
          args: TrainArgs, resume: bool = False) -> dict:
    """Run (or resume) training in args.out_dir; returns the last step's metrics."""
    if args.steps < 1:
        raise ValueError(f"steps must be >= 1, got {args.steps}")
    os.makedirs(args.out_dir, exist_ok=True)
    aux_coef = model.config.router_aux_loss_coef if args.aux_coef is None else args.aux_coef
    opt = make_optimizer(model, args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args))
    state_path = os.path.join(args.out_dir, STATE_FILE)
    start = 0
    if resume and os.path.isfile(state_path):
        start = load_state(state_path, model, opt)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args), last_epoch=start - 1)
        if start >= args.steps:
            # not an error: scripts/make_demo_model.sh resumes a finished phase on its way to the next
            print(f"{state_path} is already at step {start} of {args.steps}: nothing to train "
                  f"(raise --steps to train further)", file=sys.stderr)  # fmt: skip
            return {"step": start}
    model.train()
    log = _open_log(os.path.join(args.out_dir, LOG_FILE), start)
    bar = tqdm(total=args.steps, initial=start, disable=not args.progress, dynamic_ncols=True, desc="train")
    stream = batch_stream(examples, args.batch_tokens, args.seed, start)
    t0, tokens, metrics = time.time(), 0, {}
    for step in range(start, args.steps):
        ids, mask, positions, fb = to_tensors(next(stream))
        losses = model_losses(model, ids, mask, positions, fb, args.mtp_weight, aux_coef)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        lr = sched.get_last_lr()[0]  # the rate this step used
        opt.step()
        sched.step()
        tokens += ids.numel()
        tps = tokens / max(time.time() - t0, 1e-9)
        metrics = {k: round(float(v.detach()), 5) for k, v in losses.items()}
        metrics.update(step=step + 1, lr=lr, grad_norm=round(float(gnorm), 4),
                       tokens_per_s=round(tps, 1))  # fmt: skip
        log.write(json.dumps(metrics) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", mtp=f"{metrics.get('mtp', 0):.3f}",
                        aux=f"{metrics.get('aux', 0):.3f}", tok_s=f"{tps:.0f}")  # fmt: skip
        bar.update(1)
        done = step + 1
        if done == args.steps or (args.save_every and done % args.save_every == 0):
            save_model_dir(model, tokenizer_dir, args.out_dir, args.save_dtype)
            save_state(state_path, model, opt, done, args)
    bar.close()
    log.close()
    return metrics
