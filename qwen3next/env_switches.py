"""The QWEN3NEXT_* environment switches: one table of their names, accepted values and defaults.

`switch(name)` reads one and refuses a value the table does not list (a typo such as
QWEN3NEXT_MOE_SORTED=persistant would otherwise run the default without a word); `check_all()`
reads every one, so the CLI can refuse a bad value in one line before it loads anything. Modules
that read a switch on every call (QWEN3NEXT_KERNELS, QWEN3NEXT_CPU_EXT) keep their cheap reads;
the CLI's check covers them.
"""

from __future__ import annotations

import os

# name -> accepted values, the default first ("" = unset)
SWITCHES: dict[str, tuple[str, ...]] = {
    "QWEN3NEXT_KERNELS": ("", "torch"),
    "QWEN3NEXT_CPU_EXT": ("1", "0"),
    "QWEN3NEXT_AUTOTUNE": ("1", "0"),
    "QWEN3NEXT_GDN_FUSED": ("1", "0"),
    "QWEN3NEXT_GDN_NORM_FUSED": ("0", "1"),
    "QWEN3NEXT_GDN_DECODE_PIPELINED": ("0", "1"),
    "QWEN3NEXT_CONV_STREAM": ("1", "0"),
    "QWEN3NEXT_VERIFY_GRAPHS": ("1", "0"),
    "QWEN3NEXT_ATTN_CUDNN": ("1", "0"),
    "QWEN3NEXT_ATTN_FRESH": ("1", "0"),
    "QWEN3NEXT_MOE_SORTED": ("auto", "off", "torch", "triton", "triton_gather", "gather_torch", "persistent",
                             "persistent_mixed", "resident"),
    "QWEN3NEXT_MOE_FOLD": ("1", "0"),
    "QWEN3NEXT_FP8_SORTED": ("1", "0"),
    "QWEN3NEXT_FP8_PERSISTENT": ("down", "", "all"),
    "QWEN3NEXT_FP8_DENSE_A8": ("0", "1"),
}


def switch(name: str) -> str:
    """The switch's value (its default when unset); ValueError naming the accepted values otherwise."""
    accepted = SWITCHES[name]
    value = os.environ.get(name)
    if value is None:
        return accepted[0]
    if name == "QWEN3NEXT_KERNELS":  # read case-insensitively where it is used
        value = value.lower()
    if value not in accepted:
        shown = ", ".join(repr(v) for v in accepted)
        raise ValueError(f"{name}={os.environ[name]!r} is not one of {shown} (default {accepted[0]!r})")
    return value


def check_all() -> None:
    """Read every switch: ValueError on the first value it does not accept."""
    for name in SWITCHES:
        switch(name)
