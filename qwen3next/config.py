"""The one reader of a Qwen3-Next `config.json`, and the engine's own knobs.

`ModelConfig.from_hf` accepts both layouts the released checkpoints use: the legacy one
(top-level `rope_theta` / `partial_rotary_factor` / `rope_scaling` / `full_attention_interval`)
and the transformers-5 one (`rope_parameters`, explicit `layer_types`). Field names are the
checkpoint's names. Anything inconsistent stops with a one-line `ConfigError` naming the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config.json that this engine cannot run; the message names the field."""


LINEAR = "linear_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rotary_dim: int
    rope_type: str = "default"  # "default" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


def _merged(base: dict, over: dict) -> dict:
    """`base` updated by `over`: a dict value merges into a dict value, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    # full (gated) attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope: RopeConfig
    max_position_embeddings: int
    # gated deltanet
    linear_conv_kernel_dim: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    # feed-forward
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    # misc
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    router_aux_loss_coef: float
    initializer_range: float
    bos_token_id: int | None
    eos_token_id: tuple[int, ...]
    pad_token_id: int | None
    dtype: str | None
    num_mtp_layers: int = 1
    quantization_config: dict | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- derived -------------------------------------------------------------------------
    @property
    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR]

    @property
    def full_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL]

    def is_moe_layer(self, i: int) -> bool:
        """architecture.md §2.2: MoE unless listed in mlp_only_layers or off the sparse step."""
        return (
            i not in self.mlp_only_layers
            and self.num_experts > 0
            and (i + 1) % self.decoder_sparse_step == 0
        )

    @property
    def max_model_len_limit(self) -> int:
        """The longest context this config allows (vLLM's rule): max_position_embeddings, or with
        YaRN original_max_position_embeddings x factor (the model card's 1M-token recipe keeps
        max_position_embeddings at 262144 and adds rope_scaling with factor 4)."""
        r = self.rope
        if r.rope_type == "yarn":
            return max(self.max_position_embeddings, int(r.original_max_position_embeddings * r.factor))
        return self.max_position_embeddings

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    # ---- reading -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str, overrides: dict | None = None) -> "ModelConfig":
        """config.json of `path`, with `overrides` (vLLM's hf_overrides: nested dicts merged key by
        key, other values replaced) applied before it is read. A `rope_scaling` override also goes
        into a transformers-5 `rope_parameters` block, whose keys win over `rope_scaling`'s: the
        model card's recipe then works on either layout."""
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise ConfigError(f"no config.json in {path}")
        with open(file, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{file} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file} must hold a JSON object, not {type(data).__name__}")
        overrides = dict(overrides or {})
        # fewer layers by override (vLLM's way to try a shallow model): the first N of the file's layer_types
        n = overrides.get("num_hidden_layers")
        types = data.get("layer_types")
        if "layer_types" not in overrides and isinstance(n, int) and isinstance(types, list) and 0 < n < len(types):
            overrides["layer_types"] = types[:n]
        if isinstance(overrides.get("rope_scaling"), dict) and isinstance(data.get("rope_parameters"), dict):
            overrides["rope_parameters"] = {**overrides["rope_scaling"], **overrides.get("rope_parameters", {})}
        return cls.from_hf(_merged(data, overrides))

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        mt = d.get("model_type")
        if mt != "qwen3_next":
            raise ConfigError(f"model_type is {mt!r}; this engine runs only 'qwen3_next'")

        def get(name: str, default: Any) -> Any:
            v = d.get(name, default)
            return default if v is None else v

        def pos_int(name: str, default: int, allow_zero: bool = False) -> int:
            v = get(name, default)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                raise ConfigError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {v!r}")
            return v

        n_layers = pos_int("num_hidden_layers", 48)
        layer_types = d.get("layer_types")
        if layer_types is None:
            interval = pos_int("full_attention_interval", 4)
            layer_types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(n_layers)]
        if len(layer_types) != n_layers:
            raise ConfigError(
                f"layer_types has {len(layer_types)} entries but num_hidden_layers is {n_layers}"
            )
        for i, t in enumerate(layer_types):
            if t not in (LINEAR, FULL):
                raise ConfigError(f"layer_types[{i}] is {t!r}; expected {LINEAR!r} or {FULL!r}")

        n_heads = pos_int("num_attention_heads", 16)
        n_kv = pos_int("num_key_value_heads", 2)
        if n_heads % n_kv:
            raise ConfigError(
                f"num_attention_heads ({n_heads}) is not a multiple of num_key_value_heads ({n_kv})"
            )
        hk, hv = pos_int("linear_num_key_heads", 16), pos_int("linear_num_value_heads", 32)
        if hv % hk:
            raise ConfigError(
                f"linear_num_value_heads ({hv}) is not a multiple of linear_num_key_heads ({hk})"
            )
        head_dim = pos_int("head_dim", 256)
        num_experts = pos_int("num_experts", 512, allow_zero=True)
        topk = pos_int("num_experts_per_tok", 10)
        if num_experts and topk > num_experts:
            raise ConfigError(f"num_experts_per_tok ({topk}) exceeds num_experts ({num_experts})")
        mlp_only = tuple(get("mlp_only_layers", []))
        for i in mlp_only:
            if not isinstance(i, int) or not 0 <= i < n_layers:
                raise ConfigError(f"mlp_only_layers holds {i!r}, not a layer index below {n_layers}")
        act = get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act is {act!r}; Qwen3-Next uses 'silu'")

        max_pos = pos_int("max_position_embeddings", 32768)
        rope = _read_rope(d, head_dim, max_pos)

        eos = d.get("eos_token_id")
        eos_t = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=pos_int("vocab_size", 151936),
            hidden_size=pos_int("hidden_size", 2048),
            num_hidden_layers=n_layers,
            layer_types=tuple(layer_types),
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            rope=rope,
            max_position_embeddings=max_pos,
            linear_conv_kernel_dim=pos_int("linear_conv_kernel_dim", 4),
            linear_key_head_dim=pos_int("linear_key_head_dim", 128),
            linear_value_head_dim=pos_int("linear_value_head_dim", 128),
            linear_num_key_heads=hk,
            linear_num_value_heads=hv,
            intermediate_size=pos_int("intermediate_size", 5632),
            num_experts=num_experts,
            num_experts_per_tok=topk,
            moe_intermediate_size=pos_int("moe_intermediate_size", 512),
            shared_expert_intermediate_size=pos_int("shared_expert_intermediate_size", 512, allow_zero=True),
            norm_topk_prob=bool(get("norm_topk_prob", True)),
            decoder_sparse_step=pos_int("decoder_sparse_step", 1),
            mlp_only_layers=mlp_only,
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            hidden_act=act,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            router_aux_loss_coef=float(get("router_aux_loss_coef", 0.001)),
            initializer_range=float(get("initializer_range", 0.02)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos_t,
            pad_token_id=d.get("pad_token_id"),
            dtype=d.get("dtype") or d.get("torch_dtype"),
            num_mtp_layers=int(get("mtp_num_hidden_layers", get("num_nextn_predict_layers", 1))),
            quantization_config=d.get("quantization_config"),
            raw=dict(d),
        )


def _read_rope(d: dict, head_dim: int, max_pos: int) -> RopeConfig:
    """Merge the legacy (`rope_theta`, `rope_scaling`) and new (`rope_parameters`) spellings."""
    params: dict[str, Any] = {}
    rp = d.get("rope_parameters")
    if isinstance(rp, dict):
        params.update(rp)
    elif rp is not None:
        raise ConfigError(f"rope_parameters must be an object, got {type(rp).__name__}")
    if "rope_theta" in d and "rope_theta" not in params:
        params["rope_theta"] = d["rope_theta"]
    if "partial_rotary_factor" in d and "partial_rotary_factor" not in params:
        params["partial_rotary_factor"] = d["partial_rotary_factor"]
    rs = d.get("rope_scaling")
    if isinstance(rs, dict):
        for k, v in rs.items():
            params.setdefault(k, v)
    elif rs is not None:
        raise ConfigError(f"rope_scaling must be an object or null, got {rs!r}")
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"rope_scaling.rope_type {rope_type!r} is not supported (default, yarn)")
    theta = float(params.get("rope_theta", 10000.0))
    prf = float(params.get("partial_rotary_factor", 0.25))
    if not 0 < prf <= 1:
        raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {prf}")
    rotary_dim = int(head_dim * prf)
    if rotary_dim % 2:
        raise ConfigError(f"head_dim * partial_rotary_factor = {rotary_dim} must be even")
    if rope_type == "default":
        return RopeConfig(theta=theta, rotary_dim=rotary_dim)
    orig = params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / orig
    if float(factor) < 1:
        raise ConfigError(f"rope_scaling.factor must be >= 1, got {factor}")

    def opt(name):
        v = params.get(name)
        return None if v is None else float(v)

    return RopeConfig(
        theta=theta,
        rotary_dim=rotary_dim,
        rope_type="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=opt("attention_factor"),
        mscale=opt("mscale"),
        mscale_all_dim=opt("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )
