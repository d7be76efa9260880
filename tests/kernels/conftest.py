"""Kernel tests: Triton kernels against the plain-torch references.

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here before any
kernel module is imported) on CPU tensors in float32, at tiny shapes. Tests marked `gpu` run
only on a CUDA machine (pytest -m gpu tests/kernels), in bf16 at model-like shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere fails every bound)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def cu(lens: list[int], device: str = DEV) -> torch.Tensor:
    c = torch.zeros(len(lens) + 1, dtype=torch.long)
    c[1:] = torch.tensor(lens).cumsum(0)
    return c.to(device)


def randn(*shape, gen: torch.Generator, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Seeded normal noise on the test device (fixed seeds keep CI deterministic)."""
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEV, dtype=dtype)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
