"""Tiny random Qwen3-Next checkpoints built with transformers, for tests.

`make_tiny_checkpoint(path, layout, with_tokenizer, **overrides)` builds a float32
`transformers.Qwen3NextForCausalLM` with small dims, re-randomises every weight (norms included,
so zero-centred vs plain norms matter), adds random `mtp.*` tensors (transformers makes none),
saves sharded safetensors + index and a config.json in the transformers-5 ("new") or the
released ("legacy") layout, and optionally the tiny test tokenizer.
"""

from __future__ import annotations

import json
import math
import os

import torch

TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
    max_position_embeddings=512, rms_norm_eps=1e-6,
)  # fmt: skip
_ROPE_KEYS = ("rope_theta", "partial_rotary_factor", "rope_scaling")


def hf_config(**overrides):
    """A transformers Qwen3NextConfig from TINY + overrides. Accepts the legacy spellings
    rope_theta / partial_rotary_factor / rope_scaling (dict) / full_attention_interval too."""
    from transformers import Qwen3NextConfig

    kw = {**TINY, **overrides}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    rope.update(kw.pop("rope_parameters", {}) or {})
    for k in ("rope_theta", "partial_rotary_factor"):
        if k in kw:
            rope[k] = kw.pop(k)
    scaling = kw.pop("rope_scaling", None)
    if scaling:
        rope.update(scaling)
    interval = kw.pop("full_attention_interval", 4)
    if "layer_types" not in kw:
        kw["layer_types"] = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(kw["num_hidden_layers"])
        ]
    return Qwen3NextConfig(rope_parameters=rope, **kw)


@torch.no_grad()
def randomize_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """O(1)-scale random weights: fan-in scaled linears/experts, N(0, 0.3) zero-centred norms,
    1 + N(0, 0.3) gated norms, A_log / dt_bias spread so decays differ per head."""
    for name, p in module.named_parameters():
        if name.endswith("linear_attn.norm.weight"):
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
        elif "norm" in name:
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        elif name.endswith("A_log"):
            p.copy_(torch.empty(p.shape).uniform_(-2, 1, generator=gen))
        elif name.endswith("dt_bias"):
            p.copy_(torch.randn(p.shape, generator=gen))
        elif name.endswith("embed_tokens.weight"):
            p.copy_(torch.randn(p.shape, generator=gen))
        else:
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def _per_expert(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked expert tensors -> the checkpoint's per-expert names."""
    out = {}
    for n, t in sd.items():
        if n.endswith("mlp.experts.gate_up_proj"):
            base, i = n[: -len(".gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}.{e}.gate_proj.weight"] = t[e, :i].contiguous()
                out[f"{base}.{e}.up_proj.weight"] = t[e, i:].contiguous()
        elif n.endswith("mlp.experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"{n[: -len('.down_proj')]}.{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[n] = t.contiguous()
    return out


def make_mtp_tensors(config, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random mtp.* tensors (official names) for a transformers config: fc, three norms, and one
    full-attention decoder layer that follows layer 0's MoE rule."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextDecoderLayer

    H = config.hidden_size
    cfg = config.__class__(**{**config.to_dict(), "layer_types": ["full_attention"] * config.num_hidden_layers})
    layer = Qwen3NextDecoderLayer(cfg, 0)
    randomize_(layer, gen)
    t = {f"mtp.layers.0.{n}": v for n, v in _per_expert(layer.state_dict()).items()}
    t["mtp.fc.weight"] = torch.randn(H, 2 * H, generator=gen) / math.sqrt(2 * H)
    for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        t[f"mtp.{n}.weight"] = 0.3 * torch.randn(H, generator=gen)
    return t


def _legacy_config(d: dict) -> dict:
    """Rewrite a transformers-5 config dict in the released (legacy) layout."""
    d = dict(d)
    types = d.pop("layer_types")
    rope = dict(d.pop("rope_parameters"))
    interval = next((k for k in range(1, len(types) + 1) if all(
        (t == "full_attention") == ((i + 1) % k == 0) for i, t in enumerate(types))), None)  # fmt: skip
    if interval is None:
        raise ValueError(f"layer_types {types} cannot be written as full_attention_interval (legacy layout)")
    d["full_attention_interval"] = interval
    d["rope_theta"] = rope.pop("rope_theta")
    d["partial_rotary_factor"] = rope.pop("partial_rotary_factor", 0.25)
    d["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    d["torch_dtype"] = d.pop("dtype", "float32")
    return d


def make_tiny_checkpoint(path, layout: str = "new", with_tokenizer: bool = True, with_mtp: bool = True,
                         seed: int = 0, bf16_round: bool = False, max_shard_size: str = "200KB",
                         **config_overrides) -> str:
    """Build and save a tiny random Qwen3-Next checkpoint into `path`; return `path`.

    bf16_round rounds every weight to bf16 (stored as float32) so bf16 runs lose nothing at load.
    """
    from transformers import Qwen3NextForCausalLM

    if layout not in ("new", "legacy"):
        raise ValueError(f"layout must be 'new' or 'legacy', got {layout!r}")
    path = str(path)
    os.makedirs(path, exist_ok=True)
    gen_cfg = None
    if with_tokenizer:
        try:
            from tests.helpers.tiny_tokenizer import write_tiny_tokenizer
        except ImportError:
            write_tiny_tokenizer = None
        if write_tiny_tokenizer is not None:
            n_vocab = write_tiny_tokenizer(path)
            config_overrides["vocab_size"] = max(config_overrides.get("vocab_size", TINY["vocab_size"]), n_vocab)
            gfile = os.path.join(path, "generation_config.json")
            if os.path.isfile(gfile):
                with open(gfile, encoding="utf-8") as f:
                    gen_cfg = f.read()
                eos = json.loads(gen_cfg).get("eos_token_id")
                config_overrides.setdefault("eos_token_id", eos)
    config = hf_config(**config_overrides)
    gen = torch.Generator().manual_seed(seed)
    model = Qwen3NextForCausalLM(config).float()
    randomize_(model, gen)
    extra = make_mtp_tensors(config, gen) if with_mtp else {}
    if bf16_round:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
        extra = {n: t.bfloat16().float() for n, t in extra.items()}
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if extra:
        from safetensors.torch import save_file

        save_file(extra, os.path.join(path, "model-mtp.safetensors"), metadata={"format": "pt"})
        ifile = os.path.join(path, "model.safetensors.index.json")
        with open(ifile, encoding="utf-8") as f:
            index = json.load(f)
        index["weight_map"].update({n: "model-mtp.safetensors" for n in extra})
        with open(ifile, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    if gen_cfg is not None:  # save_pretrained overwrote the tokenizer's generation config
        with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
            f.write(gen_cfg)
    if layout == "legacy":
        cfile = os.path.join(path, "config.json")
        with open(cfile, encoding="utf-8") as f:
            d = json.load(f)
        with open(cfile, "w", encoding="utf-8") as f:
            json.dump(_legacy_config(d), f, indent=2)
    return path
