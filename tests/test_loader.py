"""Checkpoint loading and saving: sharded and single-file safetensors, per-expert tensors into the
stacked expert parameters, MTP present / absent, block-FP8 dequantisation, errors that name the
tensor, hub ids that cannot be fetched, and a save -> load round trip with the official names."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qwen3next.config import ModelConfig
from qwen3next.loader import CheckpointError, load_model, save_checkpoint
from tests.helpers.checkpoints import make_tiny_checkpoint


def _all_tensors(path):
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    out = {}
    for fn in files:
        out.update(load_file(os.path.join(path, fn)))
    return out


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    return load_model(tiny_ckpt, dtype=torch.float32, progress=False)


def test_sharded_checkpoint_maps_experts_and_mtp(tiny_ckpt, loaded):
    model, cfg = loaded
    files = os.listdir(tiny_ckpt)
    assert sum(f.endswith(".safetensors") for f in files) > 2  # really sharded
    t = _all_tensors(tiny_ckpt)
    sd = model.state_dict()
    inter = cfg.moe_intermediate_size
    for prefix in ("model.layers.1.mlp.experts", "mtp.layers.0.mlp.experts"):
        for e in (0, cfg.num_experts - 1):
            assert torch.equal(sd[f"{prefix}.gate_up_proj"][e, :inter], t[f"{prefix}.{e}.gate_proj.weight"])
            assert torch.equal(sd[f"{prefix}.gate_up_proj"][e, inter:], t[f"{prefix}.{e}.up_proj.weight"])
            assert torch.equal(sd[f"{prefix}.down_proj"][e], t[f"{prefix}.{e}.down_proj.weight"])
    assert torch.equal(sd["mtp.fc.weight"], t["mtp.fc.weight"])
    qkvz = "model.layers.0.linear_attn.in_proj_qkvz.weight"  # grouped rows kept as stored
    assert torch.equal(sd[qkvz], t[qkvz])
    assert model.mtp is not None and cfg.num_hidden_layers in model.state_spec().kv_layers


def test_save_round_trip_single_and_sharded(loaded, tmp_path):
    model, cfg = loaded
    for name, shard in (("single", 1 << 40), ("sharded", 50_000)):
        out = tmp_path / name
        save_checkpoint(model, str(out), max_shard_size=shard)
        assert os.path.isfile(out / "model.safetensors") == (name == "single")
        names = set()
        for fn in (f for f in os.listdir(out) if f.endswith(".safetensors")):
            with safe_open(str(out / fn), framework="pt") as f:
                names |= set(f.keys())
        assert "model.layers.0.mlp.experts.3.up_proj.weight" in names and "mtp.fc.weight" in names
        assert not any(n.endswith("gate_up_proj") for n in names)
        again, cfg2 = load_model(str(out), dtype=torch.float32, progress=False)
        assert cfg2 == cfg
        for (n, a), (n2, b) in zip(model.state_dict().items(), again.state_dict().items()):
            assert n == n2 and torch.equal(a, b), n


def test_checkpoint_without_mtp_loads_with_mtp_none(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "nomtp", with_tokenizer=False, with_mtp=False, layout="legacy")
    model, cfg = load_model(path, dtype=torch.float32, progress=False)
    assert model.mtp is None
    assert max(model.state_spec().kv_layers) < cfg.num_hidden_layers


def test_mtp_tensors_ignored_when_model_built_without_mtp(tiny_ckpt):
    model, _ = load_model(tiny_ckpt, dtype=torch.float32, with_mtp=False, progress=False)
    assert model.mtp is None


def _edit_copy(src, dst, extra=None, drop=None):
    shutil.copytree(src, dst)
    return _patch(dst, extra, drop)


def _patch(dst, extra=None, drop=None):
    """Drop a tensor from the index and/or add tensors in a new shard (overriding the index)."""
    ifile = os.path.join(dst, "model.safetensors.index.json")
    with open(ifile) as f:
        index = json.load(f)
    if drop:
        del index["weight_map"][drop]
    if extra:
        save_file(extra, os.path.join(dst, "extra.safetensors"))
        index["weight_map"].update({n: "extra.safetensors" for n in extra})
    with open(ifile, "w") as f:
        json.dump(index, f)
    return str(dst)


def test_errors_name_the_tensor(tiny_ckpt, tmp_path):
    p = _edit_copy(tiny_ckpt, tmp_path / "missing", drop="model.layers.2.mlp.experts.5.up_proj.weight")
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        load_model(p, dtype=torch.float32, progress=False)
    p = _edit_copy(tiny_ckpt, tmp_path / "unexpected", extra={"model.layers.0.bogus.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.bogus\.weight"):
        load_model(p, dtype=torch.float32, progress=False)
    p = _edit_copy(tiny_ckpt, tmp_path / "shape", extra={"model.norm.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \[3\]"):
        load_model(p, dtype=torch.float32, progress=False)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(str(tmp_path / "nowhere" / "deeper" / "x"), progress=False)


def test_unfetchable_hub_id_says_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="hf download no-such-org/no-such-model") as e:
        load_model("no-such-org/no-such-model", progress=False)
    assert "\n" not in str(e.value)


def _quantize(w, block):
    """Block-FP8 as the -FP8 releases store it: fp8 weight and a multiplicative scale per block."""
    n, k = w.shape
    bn, bk = block
    s = torch.zeros(-(-n // bn), -(-k // bk))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            s[i, j] = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].abs().max() / 448
    full = s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    w8 = (w / full).to(torch.float8_e4m3fn)
    return w8, s, w8.float() * full


def test_block_fp8_weights_are_dequantised(tiny_ckpt, tmp_path):
    dst = shutil.copytree(tiny_ckpt, tmp_path / "fp8")
    block = [16, 24]  # several blocks per tiny matrix, one partial at the edge
    with open(dst / "config.json") as f:
        d = json.load(f)
    d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": block}
    with open(dst / "config.json", "w") as f:
        json.dump(d, f)
    t = _all_tensors(str(dst))
    names = ["model.layers.0.linear_attn.in_proj_qkvz.weight", "model.layers.3.self_attn.o_proj.weight",
             "model.layers.1.mlp.experts.2.down_proj.weight", "mtp.layers.0.mlp.shared_expert.up_proj.weight"]
    extra, expect = {}, {}
    for i, n in enumerate(names):
        w8, s, deq = _quantize(t[n], block)
        extra[n] = w8
        extra[n + "_scale_inv"] = s.bfloat16() if i % 2 else s  # both scale dtypes are seen in releases
        expect[n] = w8.float() * (s.bfloat16().float() if i % 2 else s).repeat_interleave(block[0], 0)[
            : w8.shape[0]].repeat_interleave(block[1], 1)[:, : w8.shape[1]]
        assert (expect[n] - t[n]).abs().max() < 0.1 * t[n].abs().max()  # a faithful quantisation
    _patch(dst, extra)
    model, _ = load_model(str(dst), dtype=torch.float32, progress=False)
    sd = model.state_dict()
    torch.testing.assert_close(sd[names[0]], expect[names[0]])
    torch.testing.assert_close(sd[names[1]], expect[names[1]])
    torch.testing.assert_close(sd["model.layers.1.mlp.experts.down_proj"][2], expect[names[2]])
    torch.testing.assert_close(sd["mtp.layers.0.mlp.shared_expert.up_proj.weight"], expect[names[3]])


def test_config_written_by_save_reads_back(loaded, tmp_path):
    model, cfg = loaded
    save_checkpoint(model, str(tmp_path), max_shard_size=1 << 40)
    assert ModelConfig.from_dir(str(tmp_path)) == cfg
