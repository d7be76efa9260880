"""Checkpoint I/O: safetensors (sharded with model.safetensors.index.json, or a single
model.safetensors), bf16/fp32 or block-FP8 (architecture.md §10), local dirs or hub ids.

`load_weights` maps the checkpoint's per-expert tensors into the stacked expert parameters and
stops with an error naming any missing, unexpected or wrongly shaped tensor. FP8 weights
(`weight` * `weight_scale_inv` per 128x128 block) are dequantised into bf16/fp32 parameters, or
copied as they are into the fp8 parameters of a model converted by layers/quant.py (which also
quantises bf16 checkpoint tensors: `quantization="fp8"`). `load_model` picks (`fp8_at_load`): fp8
weights only on one CUDA device, for an FP8 checkpoint ("auto") or when asked ("fp8"). Under tensor parallelism each rank reads only
the slices its modules declare (distributed/sharding.py) and the experts it owns.
`load_format="dummy"` (vLLM's) reads config.json alone and fills random weights (`dummy_weights_`).
`save_checkpoint` writes the official (per-expert, `mtp.*`) names back out, plus config.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import zlib

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import ModelConfig
from .distributed.parallel_state import single_rank, tp_size
from .distributed.sharding import read_shard, shard_of
from .kernels import fp8 as qfp8

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_SHARD_FILE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_LEGACY_KEYS = ("rope_theta", "partial_rotary_factor", "rope_scaling", "full_attention_interval", "torch_dtype")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the tensor(s)."""


def resolve_model_dir(path_or_id: str) -> str:
    """A local directory as is; otherwise a hub id fetched with huggingface_hub.snapshot_download."""
    path_or_id = os.path.expanduser(str(path_or_id))
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id) or path_or_id.count("/") != 1 or path_or_id.startswith((".", "/")):
        raise CheckpointError(f"model path {path_or_id!r} is not a directory (nor a hub id 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"])
    except Exception as e:  # offline, unknown repo, no auth: one line saying what to do
        raise CheckpointError(
            f"could not fetch {path_or_id!r} from the Hugging Face hub ({type(e).__name__}); download it "
            f"first (`hf download {path_or_id} --local-dir DIR`) and pass DIR"
        ) from None


def _weight_map(path: str) -> dict[str, str]:
    """tensor name -> shard file (absolute)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                wm = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not valid JSON ({e})") from None
        wm = wm.get("weight_map") if isinstance(wm, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{index} has no weight_map (tensor name -> shard file)")
        out = {k: os.path.join(path, v) for k, v in wm.items()}
        # a missing shard: named now, not as a bare FileNotFoundError halfway through the load
        missing = sorted({os.path.basename(f) for f in out.values() if not os.path.isfile(f)})
        if missing:
            raise CheckpointError(f"{index} names shard file(s) missing from {path}: {_few(missing)}")
        return out
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
    try:
        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors' own errors name neither the file nor the problem well
        raise CheckpointError(f"{single} cannot be read as safetensors ({e})") from None


QUANTIZATIONS = (None, "auto", "fp8")


def fp8_at_load(quantization: str | None, cfg: ModelConfig, device) -> bool:
    """Hold fp8 weights? "auto" / None: when the checkpoint is FP8 and the model runs on one CUDA
    device (CPU and tensor-parallel ranks dequantise); "fp8": always (a bf16 checkpoint is
    quantised at load), which needs one CUDA device."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be 'auto' or 'fp8', got {quantization!r}")
    cuda = torch.device(device).type == "cuda"
    if quantization == "fp8":
        if not cuda:
            raise ValueError("quantization='fp8' needs a CUDA device (on CPU FP8 checkpoints are dequantised)")
        if tp_size() > 1:
            raise ValueError("quantization='fp8' does not support tensor_parallel_size > 1 yet")
        return True
    return (cfg.quantization_config or {}).get("quant_method") == "fp8" and cuda and tp_size() == 1


def _fp8_modules(model, wmap: dict[str, str]) -> list[str]:
    """The layers/quant.py candidates to convert: all of them for a bf16 checkpoint; for an FP8 one,
    those its checkpoint stores in fp8 (the rest stays as §10's modules_to_not_convert says)."""
    from .layers.quant import fp8_candidates

    names = fp8_candidates(model)
    if not any(k.endswith("_scale_inv") for k in wmap):
        return names
    with contextlib.ExitStack() as stack:
        files = {f: stack.enter_context(safe_open(f, framework="pt")) for f in set(wmap.values())}

        def dtype(t: str) -> str | None:  # from the safetensors header, no data read
            return files[wmap[t]].get_slice(t).get_dtype() if t in wmap else None

        return [n for n in names if "F8_E4M3" in (dtype(f"{n}.weight"), dtype(f"{n}.0.gate_proj.weight"))]


@torch.no_grad()
def load_weights(model, path_or_id: str, progress: bool = True) -> None:
    """Copy a checkpoint into `model` (cast to each parameter's dtype/device).

    A checkpoint without any mtp.* tensor sets `model.mtp = None`; mtp.* tensors are ignored when
    the model was built without MTP. Anything else unaccounted for raises CheckpointError.
    """
    path = resolve_model_dir(path_or_id)
    wmap = _weight_map(path)
    cfg: ModelConfig = model.config
    if model.mtp is not None and not any(k.startswith("mtp.") for k in wmap):
        model.mtp = None
    targets = dict(model.state_dict(keep_vars=True))  # stacked experts kept whole
    tied = cfg.tie_word_embeddings
    qcfg = cfg.quantization_config or {}
    block = tuple(qcfg.get("weight_block_size") or qfp8.BLOCK)
    filled: set[str] = set()
    expert_filled: dict[str, set] = {}
    unexpected: list[str] = []
    names = [n for n in wmap if not n.endswith(".weight_scale_inv")]
    tp = tp_size()
    with contextlib.ExitStack() as stack:
        handles: dict[str, object] = {}

        def handle(name: str):
            file = wmap[name]
            if file not in handles:
                try:
                    handles[file] = stack.enter_context(safe_open(file, framework="pt"))
                except Exception as e:  # noqa: BLE001 - a truncated / corrupt shard: name the file
                    raise CheckpointError(f"{file} cannot be read as safetensors ({e})") from None
            return handles[file]

        def read(name: str) -> torch.Tensor:
            h = handle(name)
            try:
                return h.get_tensor(name)
            except Exception as e:  # noqa: BLE001 - an index naming a tensor its shard lacks, or a cut-off file
                raise CheckpointError(f"{name} cannot be read from {wmap[name]} ({e})") from None

        for name in tqdm(names, desc="loading weights", unit="tensor", disable=not progress):
            if name.startswith("mtp.") and model.mtp is None:
                continue
            m = _EXPERT.match(name)
            target_name = f"{m.group(1)}.{'down_proj' if m.group(3) == 'down_proj' else 'gate_up_proj'}" if m else name
            if target_name not in targets:
                if not (tied and name == "lm_head.weight"):
                    unexpected.append(name)
                continue
            shard = shard_of(model, target_name) if tp > 1 and not m else None
            if shard is not None:  # only this rank's rows / columns
                fp8 = handle(name).get_slice(name).get_dtype() == "F8_E4M3"
                if fp8 and name + "_scale_inv" not in wmap:
                    raise CheckpointError(f"{name} is float8 but {name}_scale_inv is missing")
                t = read_shard(lambda n: handle(n).get_slice(n), name, shard,
                               name + "_scale_inv" if fp8 else None, block)
            elif m and tp > 1 and not _owns_expert(model, m):
                continue  # another rank's expert
            else:
                t = read(name)
            param = targets[target_name]
            scale = None  # fp8 parameters: the block scales that go with t
            pblock = _block_of(model, target_name) if param.dtype == qfp8.FP8 else block
            if t.dtype == qfp8.FP8:
                scale_name = name + "_scale_inv"
                if scale_name not in wmap:
                    raise CheckpointError(f"{name} is float8 but {scale_name} is missing")
                scale = read(scale_name).float()
                if param.dtype != qfp8.FP8:
                    t, scale = qfp8.dequantize(t, scale, block), None
            elif param.dtype == qfp8.FP8:  # quantised at load, on the parameter's device, in its blocks
                t, scale = qfp8.quantize(t.to(param.device), pblock)
            if m:
                e, part = int(m.group(2)), m.group(3)
                if e >= param.shape[0] * tp:
                    raise CheckpointError(f"{name}: expert index {e} >= num_experts {param.shape[0] * tp}")
                if tp > 1:  # index within this rank's experts
                    e -= model.get_submodule(m.group(1)).first_expert
                inter = param.shape[1] // 2 if part != "down_proj" else param.shape[2]
                dst = {"gate_proj": param[e, :inter], "up_proj": param[e, inter:], "down_proj": param[e]}[part]
                if scale is not None:  # gate and up rows own whole scale blocks (quant.experts_fit)
                    sp, si = targets[target_name + "_scale_inv"], inter // pblock[0]
                    sdst = {"gate_proj": sp[e, :si], "up_proj": sp[e, si:], "down_proj": sp[e]}[part]
                key = (e, part)
                expert_filled.setdefault(target_name, set()).add(key)
            else:
                dst = param
                if scale is not None:
                    sdst = targets[target_name + "_scale_inv"]
                filled.add(name)
            if tuple(t.shape) != tuple(dst.shape):
                raise CheckpointError(f"{name} has shape {list(t.shape)}, the model expects {list(dst.shape)}")
            dst.copy_(t)
            if scale is not None:
                if tuple(scale.shape) != tuple(sdst.shape):
                    raise CheckpointError(f"{name}_scale_inv has shape {list(scale.shape)}, the model expects "
                                          f"{list(sdst.shape)} (weight_block_size {list(pblock)})")
                sdst.copy_(scale)
    if unexpected:
        raise CheckpointError(f"unexpected tensors in checkpoint: {_few(unexpected)}")
    missing = []
    for n, p in targets.items():
        if n.endswith("mlp.experts.gate_up_proj") or n.endswith("mlp.experts.down_proj"):
            parts = ("gate_proj", "up_proj") if n.endswith("gate_up_proj") else ("down_proj",)
            got = expert_filled.get(n, set())
            if n in filled:  # a checkpoint that already holds the stacked tensor
                continue
            base = n.rsplit(".", 1)[0]
            missing += [f"{base}.{e}.{pt}.weight" for e in range(p.shape[0]) for pt in parts if (e, pt) not in got]
        elif n.endswith("_scale_inv"):  # written with its weight
            continue
        elif n not in filled and not (tied and n == "lm_head.weight"):
            missing.append(n)
    if missing:
        raise CheckpointError(f"tensors missing from checkpoint: {_few(missing)}")


def _owns_expert(model, m: re.Match) -> bool:
    """Is the per-expert tensor matched by `m` this rank's? (Indices past E count as ours, so
    the index check reports them.)"""
    e, mod = int(m.group(2)), model.get_submodule(m.group(1))
    return mod.first_expert <= e < mod.first_expert + mod.num_experts or e >= mod.num_experts * tp_size()


def _few(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f" (+{len(names) - k} more)" if len(names) > k else "")


LOAD_FORMATS = ("auto", "dummy")


def load_model(path_or_id: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               with_mtp: bool | None = None, progress: bool = True, quantization: str | None = None,
               hf_overrides: dict | None = None, load_format: str = "auto"):
    """-> (model in eval mode, ModelConfig). Parameters are allocated uninitialised, then loaded.
    `quantization` ("auto" / None, "fp8"): see fp8_at_load. `hf_overrides`: config.json keys to
    change (ModelConfig.from_dir). `load_format`: "auto" reads the safetensors; "dummy" only
    config.json, with random weights (dummy_weights_; the MTP head kept when built)."""
    from .model import Qwen3NextForCausalLM

    load_format = "auto" if load_format == "safetensors" else load_format  # vLLM's name for "auto"
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be 'auto', 'safetensors' or 'dummy', got {load_format!r}")
    dummy = load_format == "dummy"
    path = resolve_model_dir(path_or_id)
    cfg = ModelConfig.from_dir(path, hf_overrides)
    fp8 = fp8_at_load(quantization, cfg, device)
    if not dummy:
        _check_config_against_checkpoint(path, cfg, "config.json + hf_overrides" if hf_overrides else "config.json")
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(cfg, with_mtp=with_mtp)
    # cast on meta first so real memory is allocated once, in the target dtype
    model = model.to(dtype)
    if fp8:
        from .layers.quant import to_fp8_

        block = tuple((cfg.quantization_config or {}).get("weight_block_size") or qfp8.BLOCK)
        to_fp8_(model, block, None if dummy else _fp8_modules(model, _weight_map(path)))
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty re-creates parameters, which unties them
        model.lm_head.weight = model.model.embed_tokens.weight
    if dummy:
        dummy_weights_(model)
    else:
        load_weights(model, path, progress=progress)
    return model.eval(), cfg


@torch.no_grad()
def dummy_weights_(model, seed: int = 0) -> None:
    """Random weights in place (load_format="dummy"), O(1) activations at any depth as
    benchmarks/gpu_model.py's randomize_: fan-in scaled matrices, N(0, 1) embeddings, norms near
    their identity, A_log / dt_bias spread. Deterministic per full tensor: each is drawn whole, in
    its tensor-parallel-size-1 shape, on the parameter's device from a generator seeded by
    (seed, name), and this rank keeps its shard, so any tensor_parallel_size gives the same model
    (on one device type: CPU and CUDA generators differ)."""
    from .model import Qwen3NextForCausalLM

    with single_rank(), torch.device("meta"):  # the checkpoint's (whole) shapes
        whole = {n: p.shape for n, p in
                 Qwen3NextForCausalLM(model.config, with_mtp=model.mtp is not None).named_parameters()}
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.endswith("_scale_inv"):  # written with its fp8 weight
            continue
        dt = torch.bfloat16 if p.dtype == qfp8.FP8 else p.dtype
        g = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        t = torch.empty(whole[name], dtype=dt, device=p.device)
        if name.endswith("linear_attn.norm.weight"):  # the gated norm scales by w (not 1 + w)
            t.normal_(1.0, 0.1, generator=g)
        elif "norm" in name:  # zero-centred norms: 1 + w
            t.normal_(0.0, 0.1, generator=g)
        elif name.endswith("A_log"):
            t.uniform_(-2.0, 1.0, generator=g)
        elif name.endswith(("dt_bias", "embed_tokens.weight")):
            t.normal_(0.0, 1.0, generator=g)
        else:
            t.normal_(0.0, t.shape[-1] ** -0.5, generator=g)
        shard = shard_of(model, name) if tp_size() > 1 else None
        if shard is not None:
            t = torch.cat([t.narrow(shard.dim, a, b - a) for a, b in shard.ranges], dim=shard.dim)
        if p.dtype == qfp8.FP8:  # quantised in the parameter's blocks (per expert when stacked)
            block, scale = _block_of(model, name), params[name + "_scale_inv"]
            for i, (w, s) in enumerate(zip(t.view(-1, *t.shape[-2:]), scale.view(-1, *scale.shape[-2:]))):
                w8, s8 = qfp8.quantize(w, block)
                p.view(-1, *p.shape[-2:])[i].copy_(w8)
                s.copy_(s8)
        else:
            p.copy_(t)
    if any(p.is_cuda for p in params.values()):  # the whole tensors' transient blocks: back to the device
        torch.cuda.empty_cache()


def _check_config_against_checkpoint(path: str, cfg: ModelConfig, source: str) -> None:
    """Compare the sizes config.json implies with a few checkpoint headers before any memory is
    allocated: a config.json missing hidden_size / vocab_size / num_experts falls back to the
    80B's values, which would otherwise allocate an 80B model before the first shape error."""
    wmap = _weight_map(path)
    expect = {"model.embed_tokens.weight": ([cfg.vocab_size, cfg.hidden_size], "vocab_size, hidden_size")}
    if cfg.num_hidden_layers and cfg.is_moe_layer(0):
        expect["model.layers.0.mlp.gate.weight"] = ([cfg.num_experts, cfg.hidden_size], "num_experts, hidden_size")
    for name, (shape, keys) in expect.items():
        if name not in wmap:
            continue  # load_weights names missing tensors
        try:
            with safe_open(wmap[name], framework="pt") as f:
                got = list(f.get_slice(name).get_shape())
        except Exception as e:  # noqa: BLE001 - as in load_weights: name the file
            raise CheckpointError(f"{name} cannot be read from {wmap[name]} ({e})") from None
        if got != shape:
            raise CheckpointError(f"{name} has shape {got} but {source} gives {keys} = {shape} "
                                  f"(keys missing from config.json take the Qwen3-Next-80B values)")  # fmt: skip


# ---- writing ------------------------------------------------------------------------------
def checkpoint_tensors(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under the official names (per-expert experts, mtp.*), on CPU."""
    out: dict[str, torch.Tensor] = {}
    sd = model.state_dict()
    for name, t in sd.items():
        if model.config.tie_word_embeddings and name == "lm_head.weight" or name.endswith("_scale_inv"):
            continue
        if t.dtype == qfp8.FP8:  # fp8 weights are written dequantised (no quantization_config written)
            t = qfp8.dequantize(t, sd[name + "_scale_inv"], _block_of(model, name), dtype or torch.bfloat16)
        t = t.detach().to("cpu", dtype or t.dtype)
        if name.endswith("mlp.experts.gate_up_proj"):
            base, inter = name[: -len(".gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}.{e}.gate_proj.weight"] = t[e, :inter].contiguous()
                out[f"{base}.{e}.up_proj.weight"] = t[e, inter:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len(".down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}.{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[name] = t.contiguous()
    return out


def _block_of(model, param_name: str) -> tuple[int, int]:
    return model.get_submodule(param_name.rsplit(".", 1)[0]).block


def config_to_hf_dict(cfg: ModelConfig) -> dict:
    """A transformers-5 layout config.json dict (explicit layer_types, rope_parameters)."""
    r = cfg.rope
    rope = {"rope_type": r.rope_type, "rope_theta": r.theta, "partial_rotary_factor": r.rotary_dim / cfg.head_dim}
    if r.rope_type == "yarn":
        rope.update(factor=r.factor, original_max_position_embeddings=r.original_max_position_embeddings,
                    beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate)
        for k in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(r, k) is not None:
                rope[k] = getattr(r, k)
    # save_checkpoint writes dequantised weights, so a quantization_config would be a lie
    d = {k: v for k, v in cfg.raw.items() if k not in _LEGACY_KEYS and k != "quantization_config"}
    d.update(
        architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next",
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        layer_types=list(cfg.layer_types), num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rope_parameters=rope,
        max_position_embeddings=cfg.max_position_embeddings, linear_conv_kernel_dim=cfg.linear_conv_kernel_dim,
        linear_key_head_dim=cfg.linear_key_head_dim, linear_value_head_dim=cfg.linear_value_head_dim,
        linear_num_key_heads=cfg.linear_num_key_heads, linear_num_value_heads=cfg.linear_num_value_heads,
        intermediate_size=cfg.intermediate_size, num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=cfg.moe_intermediate_size,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
        decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers),
        rms_norm_eps=cfg.rms_norm_eps, hidden_act=cfg.hidden_act, tie_word_embeddings=cfg.tie_word_embeddings,
        router_aux_loss_coef=cfg.router_aux_loss_coef, initializer_range=cfg.initializer_range,
        bos_token_id=cfg.bos_token_id, pad_token_id=cfg.pad_token_id,
        eos_token_id=(list(cfg.eos_token_id) if len(cfg.eos_token_id) != 1 else cfg.eos_token_id[0])
        if cfg.eos_token_id else None,
    )
    if cfg.dtype:
        d["dtype"] = cfg.dtype
    return d


def save_checkpoint(model, out_dir: str, max_shard_size: int = 2 * 1024**3, dtype: torch.dtype | None = None,
                    write_config: bool = True) -> None:
    """Write HF-style safetensors (sharded with an index when over max_shard_size bytes) and,
    by default, config.json in the transformers-5 layout."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = checkpoint_tensors(model, dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    # as transformers' save_pretrained: drop an earlier save's weight files first, else a stale
    # index.json (preferred by the loader) would point at the old shards
    for f in os.listdir(out_dir):
        if f == "model.safetensors" or f == "model.safetensors.index.json" or _SHARD_FILE.match(f):
            os.remove(os.path.join(out_dir, f))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=meta)
    else:
        wmap = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fname), metadata=meta)
            wmap.update({n: fname for n in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f, indent=2)
    if write_config:
        d = config_to_hf_dict(model.config)
        if dtype is not None:
            d["dtype"] = str(dtype).replace("torch.", "")
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2)
