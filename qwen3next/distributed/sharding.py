"""Which part of each checkpoint tensor a rank owns, and reading just that part.

Sharded modules record `tp_shards = {param name: Shard}` when built with tp_size() > 1 (a plain
attribute on the module: it survives `to_empty`, which re-creates parameters). A `Shard` is a list
of [start, stop) ranges along one dim of the global tensor, concatenated in order. The loader reads
each range through safetensors' get_slice, so a rank never materialises another rank's rows; FP8
scale blocks are sliced along with them (architecture.md §10).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .parallel_state import tp_rank, tp_size


@dataclass(frozen=True)
class Shard:
    dim: int
    ranges: tuple[tuple[int, int], ...]


def even_range(total: int, unit: int = 1) -> tuple[int, int]:
    """This rank's [start, stop) of `total` items split evenly, in multiples of `unit` rows."""
    n = total // tp_size()
    return tp_rank() * n * unit, (tp_rank() + 1) * n * unit


def rows(total: int, unit: int = 1) -> Shard:
    return Shard(0, (even_range(total, unit),))


def cols(total: int, unit: int = 1) -> Shard:
    return Shard(1, (even_range(total, unit),))


def check_divisible(cfg, n: int) -> None:
    """One-line ValueError naming the first config field that does not split over n ranks."""
    fields = [("num_attention_heads", cfg.num_attention_heads), ("linear_num_key_heads", cfg.linear_num_key_heads),
              ("num_experts", cfg.num_experts), ("vocab_size", cfg.vocab_size),
              ("intermediate_size", cfg.intermediate_size),
              ("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size)]
    for name, v in fields:
        if v and v % n:
            raise ValueError(f"{name} ({v}) is not divisible by tensor_parallel_size ({n})")
    kv = cfg.num_key_value_heads
    if kv % n and n % kv:
        raise ValueError(f"num_key_value_heads ({kv}) must divide or be a multiple of tensor_parallel_size ({n})")


def kv_head_range(num_kv_heads: int) -> tuple[int, int]:
    """This rank's kv heads: an even split, or (fewer kv heads than ranks) the one head its query
    heads read, replicated on size // num_kv_heads ranks as vLLM does."""
    n = tp_size()
    if num_kv_heads >= n:
        return even_range(num_kv_heads)
    h = tp_rank() * num_kv_heads // n
    return h, h + 1


def shard_of(model: torch.nn.Module, param_name: str) -> Shard | None:
    """The Shard its module recorded for `param_name` (None: replicated, or tp_size() == 1)."""
    mod_name, _, leaf = param_name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    return (getattr(mod, "tp_shards", None) or {}).get(leaf)


def read_shard(get_slice, name: str, shard: Shard, scale_name: str | None = None,
               block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Read `shard` of checkpoint tensor `name`; with `scale_name` (FP8) dequantise each range with
    the scale blocks covering it. get_slice(name) -> a safetensors slice."""
    src = get_slice(name)
    ndim = len(src.get_shape())
    parts = []
    for a, b in shard.ranges:
        idx = [slice(None)] * ndim
        idx[shard.dim] = slice(a, b)
        t = src[tuple(idx)]
        if scale_name is not None:
            bd = block[shard.dim]
            sidx = [slice(None)] * ndim
            sidx[shard.dim] = slice(a // bd, -(-b // bd))
            s = get_slice(scale_name)[tuple(sidx)].float()
            for d in range(ndim):
                s = s.repeat_interleave(block[d], d)
            off = [0] * ndim
            off[shard.dim] = a - (a // bd) * bd  # where the range starts inside its first block
            s = s[tuple(slice(o, o + n) for o, n in zip(off, t.shape))]
            t = t.float() * s
        parts.append(t)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=shard.dim)
