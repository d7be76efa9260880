"""Triton versions of the kernels in qwen3next/kernels (same signatures as the references).

Each module here mirrors one reference module (norm, conv1d, delta_rule, attention, moe) plus
`gdn_decode` (the fused one-token DeltaNet step). They run on CUDA tensors, and on CPU tensors
under TRITON_INTERPRET=1 (how the CPU test suite checks them). `available()` says whether
triton can be imported at all; kernels/ops.py decides when to use them.
"""

from __future__ import annotations


def available() -> bool:
    """True when the triton package imports (it is optional on CPU-only machines)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
