"""Audit (session 5): broken local checkpoints fail with one CheckpointError line naming the file:
a corrupt or truncated safetensors file, a shard the index names but the dir lacks, a corrupt
index, an index pointing a tensor at the wrong shard."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from qwen3next.loader import CheckpointError, load_model, save_checkpoint
from qwen3next.train.presets import preset_config
from qwen3next.train.trainer import build_model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    model = build_model(preset_config("tiny", 300, 0, 1), 0)
    root = tmp_path_factory.mktemp("ck")
    single, sharded = root / "single", root / "sharded"
    save_checkpoint(model, str(single))
    save_checkpoint(model, str(sharded), max_shard_size=20000)
    return single, sharded


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _load(path):
    return load_model(str(path), dtype=torch.float32, progress=False)


def test_single_and_sharded_load(dirs):
    single, sharded = dirs
    assert sorted(os.listdir(single)) == ["config.json", "model.safetensors"]
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 3
    a, b = _load(single)[0], _load(sharded)[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        _load(path)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    return msg


def test_corrupt_and_truncated_single_file(dirs, tmp_path):
    bad = _copy(dirs[0], tmp_path / "c")
    (bad / "model.safetensors").write_bytes(b"garbage")
    assert "model.safetensors cannot be read" in _error(bad)
    cut = _copy(dirs[0], tmp_path / "t")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "model.safetensors cannot be read" in _error(cut)


def test_missing_shard_and_index_to_missing_file(dirs, tmp_path):
    d = _copy(dirs[1], tmp_path / "m")
    shard = sorted(f for f in os.listdir(d) if f.startswith("model-"))[1]
    os.remove(d / shard)
    assert shard in _error(d) and "missing" in _error(d)
    d = _copy(dirs[1], tmp_path / "i")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"][next(iter(idx["weight_map"]))] = "nope.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    assert "nope.safetensors" in _error(d)


def test_corrupt_index_and_wrong_shard(dirs, tmp_path):
    d = _copy(dirs[1], tmp_path / "j")
    (d / "model.safetensors.index.json").write_text("{bad")
    assert "index.json is not valid JSON" in _error(d)
    d = _copy(dirs[1], tmp_path / "w")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    names = list(idx["weight_map"])
    idx["weight_map"][names[0]] = idx["weight_map"][names[-1]]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    assert names[0] in _error(d)


def test_truncated_shard(dirs, tmp_path):
    d = _copy(dirs[1], tmp_path / "s")
    shard = sorted(f for f in os.listdir(d) if f.startswith("model-"))[2]
    data = (d / shard).read_bytes()
    (d / shard).write_bytes(data[: len(data) // 2])
    assert shard in _error(d)


@pytest.mark.parametrize("key", ["hidden_size", "num_experts"])
def test_config_missing_size_key_named_before_allocation(dirs, tmp_path, key):
    d = _copy(dirs[0], tmp_path / key)
    cfg = json.loads((d / "config.json").read_text())
    del cfg[key]  # falls back to the 80B's value: refused from the headers, nothing allocated
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _error(d)
    assert "config.json gives" in msg and key in msg


def test_resave_over_a_sharded_dir_drops_the_stale_index(dirs, tmp_path):
    d = _copy(dirs[1], tmp_path / "over")
    other = build_model(preset_config("tiny", 300, 0, 1), 1)  # other weights, one file
    save_checkpoint(other, str(d))
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    loaded = _load(d)[0]
    assert all(torch.equal(x, y) for x, y in zip(loaded.state_dict().values(), other.state_dict().values()))
