"""ModelConfig.from_hf on both config.json layouts (legacy as released, transformers-5 as
re-serialised) and its one-line errors that name the offending field."""

from __future__ import annotations

import pytest

from qwen3next.config import FULL, LINEAR, ConfigError, ModelConfig
from tests.helpers.checkpoints import _legacy_config, hf_config

# the released 80B config.json (legacy layout), trimmed to what the reader looks at
LEGACY_80B = dict(
    model_type="qwen3_next", vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
    num_attention_heads=16, num_key_value_heads=2, head_dim=256, max_position_embeddings=262144,
    rope_theta=10000000, partial_rotary_factor=0.25, rope_scaling=None, full_attention_interval=4,
    linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
    linear_num_value_heads=32, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512,
    shared_expert_intermediate_size=512, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    intermediate_size=5120, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False,
    torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151645,
)  # fmt: skip
NEW_80B = {
    **{k: v for k, v in LEGACY_80B.items()
       if k not in ("rope_theta", "partial_rotary_factor", "rope_scaling", "full_attention_interval", "torch_dtype")},
    "layer_types": [FULL if (i + 1) % 4 == 0 else LINEAR for i in range(48)],
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
    "dtype": "bfloat16",
}  # fmt: skip


def _same(a: ModelConfig, b: ModelConfig):
    assert a.layer_types == b.layer_types and a.rope == b.rope
    assert a == b  # every field (raw excluded)


def test_80b_legacy_and_new_layouts_agree():
    a, b = ModelConfig.from_hf(LEGACY_80B), ModelConfig.from_hf(NEW_80B)
    _same(a, b)
    assert a.full_layers == list(range(3, 48, 4)) and len(a.linear_layers) == 36
    assert a.rope.rotary_dim == 64 and a.rope.theta == 1e7 and a.rope.rope_type == "default"
    assert a.linear_conv_dim == 8192 and a.eos_token_id == (151645,) and a.dtype == "bfloat16"
    assert all(a.is_moe_layer(i) for i in range(48))


def test_yarn_in_both_layouts():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}
    a = ModelConfig.from_hf({**LEGACY_80B, "rope_scaling": yarn})
    b = ModelConfig.from_hf({**NEW_80B, "rope_parameters": {**NEW_80B["rope_parameters"], **yarn}})
    _same(a, b)
    assert a.rope.rope_type == "yarn" and a.rope.factor == 4.0 and a.rope.original_max_position_embeddings == 262144


@pytest.mark.parametrize("overrides", [
    dict(full_attention_interval=2, partial_rotary_factor=0.5, decoder_sparse_step=2),
    dict(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}, rope_theta=5e5),
])  # fmt: skip
def test_tiny_checkpoint_layouts_agree(overrides):
    new = hf_config(**overrides).to_dict()
    a, b = ModelConfig.from_hf(new), ModelConfig.from_hf(_legacy_config(new))
    _same(a, b)


def test_irregular_layer_types_and_dense_layers():
    types = [FULL, LINEAR, LINEAR, FULL, LINEAR]
    d = hf_config(num_hidden_layers=5, layer_types=types, mlp_only_layers=[1, 3]).to_dict()
    c = ModelConfig.from_hf(d)
    assert c.full_layers == [0, 3] and c.linear_layers == [1, 2, 4]
    assert [c.is_moe_layer(i) for i in range(5)] == [True, False, True, False, True]
    with pytest.raises(ValueError, match="cannot be written as full_attention_interval"):
        _legacy_config(d)


@pytest.mark.parametrize("patch, field", [
    ({"model_type": "qwen3_moe"}, "model_type"),
    ({"layer_types": [LINEAR] * 47}, "layer_types"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"linear_num_key_heads": 12}, "linear_num_key_heads"),
    ({"layer_types": [LINEAR] * 47 + ["sliding_attention"]}, "layer_types[47]"),
    ({"num_experts_per_tok": 600}, "num_experts_per_tok"),
    ({"mlp_only_layers": [48]}, "mlp_only_layers"),
    ({"partial_rotary_factor": 0}, "partial_rotary_factor"),
])  # fmt: skip
def test_errors_are_one_line_and_name_the_field(patch, field):
    base = NEW_80B if "layer_types" in patch else LEGACY_80B
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf({**base, **patch})
    msg = str(e.value)
    assert field in msg and "\n" not in msg


@pytest.mark.parametrize("text", ["[1]", "3", '"qwen3_next"'])
def test_config_json_that_is_no_object_is_named(tmp_path, text):
    """Valid JSON that is not an object: a ConfigError naming the file (was a bare TypeError)."""
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=r"config\.json must hold a JSON object"):
        ModelConfig.from_dir(str(tmp_path))


def test_fewer_layers_by_override_keep_the_first_layer_types(tmp_path):
    """hf_overrides={"num_hidden_layers": N} on a config.json listing layer_types (transformers 5)
    takes the first N of them, as vLLM runs the first N layers (was 'layer_types has 48 entries but
    num_hidden_layers is 6'); more layers than listed, or an explicit mismatch, stay errors."""
    import json

    (tmp_path / "config.json").write_text(json.dumps(NEW_80B))
    six = ModelConfig.from_dir(str(tmp_path), {"num_hidden_layers": 6})
    assert six.num_hidden_layers == 6 and six.layer_types == tuple(NEW_80B["layer_types"][:6])
    assert six.full_layers == [3] and six.linear_layers == [0, 1, 2, 4, 5]
    with pytest.raises(ConfigError, match="layer_types has 48 entries but num_hidden_layers is 50"):
        ModelConfig.from_dir(str(tmp_path), {"num_hidden_layers": 50})
    with pytest.raises(ConfigError, match="layer_types has 3 entries but num_hidden_layers is 6"):
        ModelConfig.from_dir(str(tmp_path), {"num_hidden_layers": 6, "layer_types": [LINEAR] * 3})
