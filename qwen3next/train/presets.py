"""Model sizes for training from scratch, as HF `config.json` dicts (model_type qwen3_next).

`demo` is the shipped demo model: a small hybrid with both layer types (DeltaNet, gated
attention), a sparse MoE with a shared expert in every layer, and one MTP layer; it learns the
synthetic tasks of data.py in well under 30 minutes on 2 CPU cores. `tiny` is for tests.
"""

from __future__ import annotations


def _base(vocab_size: int, pad: int, eos: int) -> dict:
    return {
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "linear_conv_kernel_dim": 4,
        "initializer_range": 0.02,
        "bos_token_id": pad,  # as Qwen3: bos = pad = <|endoftext|>, never prepended
        "pad_token_id": pad,
        "eos_token_id": eos,
        "use_cache": True,
        "mtp_num_hidden_layers": 1,
    }


PRESETS = {
    "demo": {
        "hidden_size": 192,
        # tied (the 80B is untied): copying a rare token (a city) from the prompt then needs no
        # per-token alignment of embedding and lm_head rows, which the short budget cannot afford
        "tie_word_embeddings": True,
        "num_hidden_layers": 4,
        # alternate the two mixers (the 80B has 3 DeltaNet : 1 attention; at 4 layers 1:1 keeps
        # two attention layers for the digit look-ups the arithmetic needs)
        "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 256,
        "intermediate_size": 512,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "max_position_embeddings": 4096,
        "router_aux_loss_coef": 0.01,
    },
    "tiny": {
        "hidden_size": 32,
        "tie_word_embeddings": False,
        "num_hidden_layers": 2,
        "layer_types": ["linear_attention", "full_attention"],
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "linear_num_key_heads": 1,
        "linear_num_value_heads": 2,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16,
        "intermediate_size": 64,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "max_position_embeddings": 2048,
        "router_aux_loss_coef": 0.01,
    },
}


def preset_config(name: str, tokenizer_size: int, pad: int, eos: int) -> dict:
    """config.json dict of preset `name`; vocab rounded up to a multiple of 64 (the extra ids are
    padding with no token, as in the real 151,936-row vocabulary)."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r}; have {sorted(PRESETS)}")
    vocab = -(-tokenizer_size // 64) * 64
    return {**_base(vocab, pad, eos), **PRESETS[name]}
