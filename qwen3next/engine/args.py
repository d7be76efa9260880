"""EngineArgs: the engine's knobs (vLLM names), checked once with one-line ValueErrors."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# vLLM's MambaDType values for the recurrent (SSM) state pool
_STATE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EngineArgs:
    model: str | None = None  # model dir or hub id (None: the caller passes a built model)
    dtype: str = "auto"  # "auto": the checkpoint's dtype on GPU, float32 on CPU
    device: str | None = None  # "cpu" | "cuda" | "cuda:N"; None: cuda when available
    seed: int = 0
    # ranks, one process each (rank 0 is this one): heads, experts and vocab split over them
    tensor_parallel_size: int = 1
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None  # None: the model's limit (ModelConfig.max_model_len_limit)
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # None: gpu_memory_utilization on GPU, 4 GiB on CPU
    gpu_memory_utilization: float = 0.9
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False  # CUDA: True runs decode steps eagerly instead of replaying CUDA graphs
    # vLLM's {"method": "qwen3_next_mtp", "num_speculative_tokens": k} (dict or JSON text);
    # checked into a SpeculativeConfig (or None) at construction
    speculative_config: object = None
    # vLLM's spelling: None / "auto" keeps an FP8 checkpoint's block-FP8 weights on one CUDA device
    # (CPU dequantises); "fp8" also quantises a bf16 checkpoint at load (loader.fp8_at_load)
    quantization: str | None = None
    # automatic prefix caching (engine/prefix_cache.py). Off by default, as vLLM has it for hybrid
    # models (there it needs --mamba-cache-mode align): snapshots take state memory from the KV
    # budget and prefill chunks end at snapshot boundaries, so only workloads sharing prefixes gain
    enable_prefix_caching: bool = False
    # DeltaNet state snapshots every this many tokens (a multiple of block_size): the granularity
    # of reuse; larger means fewer chunk cuts in prefill. None: 256 rounded up to a multiple of
    # block_size (so any block_size works without setting it)
    prefix_caching_state_block: int | None = None
    # share of the cache budget given to snapshot slots (at least one)
    prefix_caching_state_fraction: float = 0.1
    # vLLM's hf_overrides: config.json keys changed at load (dict or JSON text), e.g. the model
    # card's 1M-token YaRN: {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
    # "original_max_position_embeddings": 262144}}
    hf_overrides: object = None
    # vLLM's mamba_ssm_cache_dtype: the dtype the DeltaNet recurrent states are kept in between steps
    # (every kernel computes in float32 and rounds on store). "auto" keeps float32, as SGLang's
    # default and the Qwen3.5 configs' mamba_ssm_dtype (vLLM's "auto" would follow the model dtype);
    # "bfloat16" halves the state bytes: decode reads and writes them every step, and more fit
    mamba_ssm_cache_dtype: str = "auto"
    # vLLM's load_format: "auto" reads the checkpoint's safetensors; "dummy" reads config.json alone
    # and fills random weights, each rank only its shard (loader.dummy_weights_): benchmarks of a
    # size or architecture without writing its checkpoint
    load_format: str = "auto"

    def __post_init__(self) -> None:
        def pos_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
            pos_int(name)
        pos_int("prefix_caching_state_block", allow_none=True)
        if self.prefix_caching_state_block is None:
            self.prefix_caching_state_block = -(-256 // self.block_size) * self.block_size
        pos_int("max_model_len", allow_none=True)
        pos_int("kv_cache_memory_bytes", allow_none=True)
        # (torch.manual_seed's range; beyond it the engine start failed with "Overflow when unpacking long long")
        if not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
        if self.mamba_ssm_cache_dtype not in _STATE_DTYPES:
            raise ValueError(f"mamba_ssm_cache_dtype must be 'auto', 'float32', 'bfloat16' or 'float16', "
                             f"got {self.mamba_ssm_cache_dtype!r}")
        if self.load_format == "safetensors":  # vLLM's name for what "auto" reads here
            self.load_format = "auto"
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto', 'safetensors' or 'dummy', got {self.load_format!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.device is not None:
            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}") from None
            if dev.type not in ("cpu", "cuda"):
                raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device is {self.device!r} but torch sees no CUDA device")
        if self.quantization not in (None, "auto", "fp8"):
            raise ValueError(f"quantization must be 'auto' or 'fp8', got {self.quantization!r}")
        if self.quantization == "fp8":
            if self.torch_device().type != "cuda":
                raise ValueError("quantization='fp8' needs a CUDA device (on CPU FP8 checkpoints are dequantised)")
            if self.tensor_parallel_size > 1:
                raise ValueError("quantization='fp8' does not support tensor_parallel_size > 1 yet")
        if isinstance(self.hf_overrides, str):
            try:
                self.hf_overrides = json.loads(self.hf_overrides)
            except json.JSONDecodeError as e:
                raise ValueError(f"hf_overrides is not valid JSON: {e}") from None
        if self.hf_overrides is not None and not isinstance(self.hf_overrides, dict):
            raise ValueError(f"hf_overrides must be a JSON object, got {self.hf_overrides!r}")
        from qwen3next.engine.spec_decode import SpeculativeConfig

        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        if self.prefix_caching_state_block % self.block_size:
            raise ValueError(f"prefix_caching_state_block ({self.prefix_caching_state_block}) must be a "
                             f"multiple of block_size ({self.block_size})")
        if not 0 < self.prefix_caching_state_fraction < 1:
            raise ValueError(f"prefix_caching_state_fraction must be in (0, 1), got "
                             f"{self.prefix_caching_state_fraction!r}")
        if self.enable_prefix_caching and self.speculative_config is not None and self.tensor_parallel_size > 1:
            # a hit copies a KV block outside a forward, which the workers do not replay yet
            raise ValueError("enable_prefix_caching with speculative_config needs tensor_parallel_size 1")
        if (not self.enable_chunked_prefill and self.max_model_len is not None
                and self.max_num_batched_tokens < self.max_model_len):
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when enable_chunked_prefill is False"
            )

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def torch_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if device.type == "cpu":
            return torch.float32
        return _DTYPES.get(checkpoint_dtype or "bfloat16", torch.bfloat16)

    def state_dtype(self) -> torch.dtype:
        """The recurrent state pool's dtype (mamba_ssm_cache_dtype; "auto": float32)."""
        return _DTYPES.get(self.mamba_ssm_cache_dtype, torch.float32)
