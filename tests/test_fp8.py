"""Block-FP8 weights at load (CPU): quantise / dequantise, the load-time choice (fp8_at_load),
an FP8 checkpoint kept in fp8 (the same logits as its dequantised load, modules_to_not_convert
respected), a bf16 model quantised at load, writing an fp8 model back out, and the option's
validation in EngineArgs."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qwen3next import loader
from qwen3next.engine.args import EngineArgs
from qwen3next.forward_batch import ForwardBatch
from qwen3next.kernels import fp8 as qfp8
from qwen3next.layers.quant import FP8_LINEAR, Fp8Linear, to_fp8_
from qwen3next.loader import CheckpointError, checkpoint_tensors, fp8_at_load, load_model

BLOCK = (16, 16)  # the tiny model's moe_intermediate_size (32) holds whole blocks
KEPT_BF16 = "model.layers.0.linear_attn.out_proj.weight"  # an fp8 candidate the checkpoint leaves bf16


def test_quantize_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 70, generator=g) * torch.linspace(0.01, 3, 70)  # partial blocks at both edges
    w[:16, :16] = 0  # an all-zero block
    w8, s = qfp8.quantize(w, BLOCK)
    assert w8.dtype == qfp8.FP8 and s.shape == (3, 5)
    deq = qfp8.dequantize(w8, s, BLOCK)
    assert float((deq - w).norm() / w.norm()) < 0.04
    assert torch.equal(deq[:16, :16], torch.zeros(16, 16))
    blk = w8[16:32, 16:32].float().abs().amax()  # each block's largest magnitude maps to 448
    assert blk == qfp8.FP8_MAX


def _fp8_checkpoint(src, dst) -> dict:
    """The tiny checkpoint as an -FP8 release stores it: §10's projections and experts in fp8 with
    block scales (one left bf16), one model.safetensors. -> the fp8 tensors written."""
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    t = {}
    for fn in files:
        t.update(load_file(os.path.join(src, fn)))
    os.makedirs(dst)
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and not f.endswith(".index.json"):
            shutil.copy(os.path.join(src, f), dst)
    out, fp8 = {}, {}
    for n, w in t.items():
        mod = n[: -len(".weight")]
        expert = ".mlp.experts." in n
        if n.endswith(".weight") and (FP8_LINEAR.search(mod) or expert) and n != KEPT_BF16:
            w8, s = qfp8.quantize(w, BLOCK)
            out[n], out[n + "_scale_inv"] = w8, s
            fp8[n] = (w8, s)
        else:
            out[n] = w.bfloat16()
    save_file(out, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        d = json.load(f)
    d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": list(BLOCK)}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(d, f)
    return fp8


@pytest.fixture(scope="module")
def fp8_ckpt(tiny_ckpt, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("fp8") / "ckpt")
    return dst, _fp8_checkpoint(tiny_ckpt, dst)


def test_fp8_at_load_choice(fp8_ckpt, tiny_ckpt):
    cfg8 = loader.ModelConfig.from_dir(fp8_ckpt[0])
    cfg = loader.ModelConfig.from_dir(tiny_ckpt)
    assert fp8_at_load("auto", cfg8, "cuda") and fp8_at_load(None, cfg8, "cuda:0")
    assert not fp8_at_load("auto", cfg8, "cpu")  # CPU dequantises
    assert not fp8_at_load("auto", cfg, "cuda")  # a bf16 checkpoint stays bf16 unless asked
    assert fp8_at_load("fp8", cfg, "cuda")
    with pytest.raises(ValueError, match="quantization='fp8' needs a CUDA device"):
        fp8_at_load("fp8", cfg, "cpu")
    with pytest.raises(ValueError, match="quantization must be"):
        fp8_at_load("int4", cfg, "cuda")
    with pytest.raises(ValueError, match="quantization must be"):
        EngineArgs(quantization="awq")
    with pytest.raises(ValueError, match="quantization='fp8' needs a CUDA device"):
        EngineArgs(quantization="fp8", device="cpu")


def _logits(model, ids):
    T = ids.shape[0]
    with torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(T), ForwardBatch.full([T])))


def test_fp8_checkpoint_kept_in_fp8(fp8_ckpt, monkeypatch):
    """Loaded as on a GPU (fp8_at_load forced), run through the reference kernels on CPU: the fp8
    bytes and scales are the checkpoint's and the logits equal the dequantised model's."""
    path, fp8 = fp8_ckpt
    monkeypatch.setenv("QWEN3NEXT_KERNELS", "torch")  # the layers' CPU fusions read bf16 weights
    deq, _ = load_model(path, dtype=torch.float32, progress=False)  # CPU: dequantised
    monkeypatch.setattr(loader, "fp8_at_load", lambda *a: True)
    model, _ = load_model(path, dtype=torch.float32, progress=False)
    lin = model.model.layers[0].linear_attn
    assert isinstance(lin.in_proj_qkvz, Fp8Linear) and lin.in_proj_qkvz.block == BLOCK
    assert type(lin.out_proj) is nn.Linear and lin.out_proj.weight.dtype == torch.float32  # left bf16
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[1].mlp.gate) is nn.Linear
    w8, s = fp8["model.layers.0.linear_attn.in_proj_qkvz.weight"]
    assert torch.equal(lin.in_proj_qkvz.weight.view(torch.uint8), w8.view(torch.uint8))
    assert torch.equal(lin.in_proj_qkvz.weight_scale_inv, s)
    ex = model.model.layers[2].mlp.experts
    gate8, gs = fp8["model.layers.2.mlp.experts.5.gate_proj.weight"]
    up8, us = fp8["model.layers.2.mlp.experts.5.up_proj.weight"]
    assert ex.gate_up_proj.dtype == qfp8.FP8
    assert torch.equal(ex.gate_up_proj[5].view(torch.uint8), torch.cat([gate8, up8]).view(torch.uint8))
    assert torch.equal(ex.gate_up_proj_scale_inv[5], torch.cat([gs, us]))
    assert isinstance(model.mtp.layers[0].self_attn.q_proj, Fp8Linear)
    ids = torch.randint(0, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(model, ids), _logits(deq, ids), rtol=1e-4, atol=1e-4)
    # written back out: official names, dequantised, no scales
    out = checkpoint_tensors(model)
    want = checkpoint_tensors(deq)
    assert out.keys() == want.keys() and not any(k.endswith("_scale_inv") for k in out)
    n = "model.layers.2.mlp.experts.5.up_proj.weight"
    torch.testing.assert_close(out[n].float(), want[n].float(), rtol=1e-2, atol=1e-2)


def test_fp8_checkpoint_scale_shape_checked(fp8_ckpt, tmp_path, monkeypatch):
    path = shutil.copytree(fp8_ckpt[0], tmp_path / "bad")
    with open(path / "config.json") as f:
        d = json.load(f)
    d["quantization_config"]["weight_block_size"] = [32, 32]  # scales no longer fit the weights
    with open(path / "config.json", "w") as f:
        json.dump(d, f)
    monkeypatch.setattr(loader, "fp8_at_load", lambda *a: True)
    with pytest.raises(CheckpointError, match=r"_scale_inv has shape"):
        load_model(str(path), dtype=torch.float32, progress=False)


def test_bf16_model_quantised_at_load(tiny_ckpt, monkeypatch):
    """to_fp8_ on a loaded model (what quantization='fp8' does with a bf16 checkpoint): §10's
    modules in fp8 within fp8 rounding of the originals, and the model computes what the same
    model with those weights dequantised computes (the tiny random model is too chaotic for a
    bound against the original's logits: 3% weight noise moves them ~35%)."""
    monkeypatch.setenv("QWEN3NEXT_KERNELS", "torch")
    model, _ = load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    deq, _ = load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    w = model.model.layers[3].self_attn.o_proj.weight.detach().clone()
    done = to_fp8_(model, BLOCK)
    assert "model.layers.3.self_attn.o_proj" in done and "model.layers.1.mlp.experts" in done
    o = model.model.layers[3].self_attn.o_proj
    assert isinstance(o, Fp8Linear)
    assert float((qfp8.dequantize(o.weight, o.weight_scale_inv, BLOCK) - w).norm() / w.norm()) < 0.04
    assert model.model.layers[1].mlp.experts.down_proj.dtype == qfp8.FP8
    with torch.no_grad():
        for name in done:
            q, d = model.get_submodule(name), deq.get_submodule(name)
            for p in ("gate_up_proj", "down_proj") if name.endswith("experts") else ("weight",):
                getattr(d, p).copy_(qfp8.dequantize(getattr(q, p), getattr(q, p + "_scale_inv"), BLOCK))
    ids = torch.randint(0, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(model, ids), _logits(deq, ids), rtol=1e-4, atol=1e-4)


def test_bf16_checkpoint_quantised_by_the_loader(tiny_ckpt, monkeypatch):
    """quantization='fp8' on a bf16 checkpoint: the loader quantises each tensor as it reads it
    (experts one per-expert tensor at a time), giving the bytes to_fp8_ gives the loaded model."""
    monkeypatch.setattr(loader, "fp8_at_load", lambda *a: True)
    monkeypatch.setattr(qfp8, "BLOCK", BLOCK)  # the tiny experts' intermediate size (32) needs 16-row blocks
    model, _ = load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    monkeypatch.undo()
    ref, _ = load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    to_fp8_(ref, BLOCK)
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    n8 = [k for k, t in want.items() if t.dtype == qfp8.FP8]
    assert "model.layers.1.mlp.experts.gate_up_proj" in n8 and "model.layers.3.self_attn.q_proj.weight" in n8
    for k in n8:
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k
        torch.testing.assert_close(got[k + "_scale_inv"], want[k + "_scale_inv"])
