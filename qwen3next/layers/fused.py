"""Derived weights for the CPU inference path: a concatenation of several parameters, rebuilt only
when one of them changes.

On CPU a tiny model's step is dominated by per-op overhead, so one matmul against the stacked
rows of several projections beats several matmuls. The copy is keyed by each source's identity,
storage pointer and version counter (loading weights, `.to()`, or an optimizer step invalidates it).
Only used without autograd on CPU tensors (`ops.cpu_fast_ok`), never while training.
"""

from __future__ import annotations

from typing import Callable

import torch


class DerivedWeight:
    """`get(*params)` -> build(*params), cached until a parameter is replaced or written to."""

    def __init__(self, build: Callable[..., torch.Tensor]):
        self.build = build
        self._key: tuple | None = None
        self._value: torch.Tensor | None = None

    def get(self, *params: torch.Tensor) -> torch.Tensor:
        # inference tensors (a model loaded under inference_mode) keep no version counter
        key = tuple((id(p), p.data_ptr(), -1 if p.is_inference() else p._version) for p in params)
        if key != self._key:
            # a normal (not inference-mode) tensor, usable in any later mode
            with torch.inference_mode(False), torch.no_grad():
                self._value = self.build(*params)
            self._key = key
        return self._value
