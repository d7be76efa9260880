"""Process-wide settings for serving on CPU, applied once by `qwen3next serve` before the model loads.

* `keep_freed_memory`: glibc hands every allocation above its mmap threshold a fresh mapping and
  unmaps it on free, so each step page-faults its multi-megabyte temporaries back in (a prefill of
  a few thousand tokens: tens of thousands of faults, ~40% of the step's CPU time on the serving
  benchmark). Raising the mmap threshold to glibc's ceiling and the trim threshold keeps those
  pages in the process for reuse. A no-op without glibc.
* `leave_core_for_http`: the engine thread's intra-op pool would use every core, spinning at each
  op's barrier against the event loop that streams the tokens; one core is left to the HTTP side
  (vLLM's CPU server does the same). On 2 cores this halves the CPU per token at one stream.
  An explicit OMP_NUM_THREADS wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import torch

log = logging.getLogger("qwen3next")

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h>


def keep_freed_memory() -> bool:
    """Tune glibc malloc for big short-lived tensors; True when it applied."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # 32 MiB is glibc's ceiling for the mmap threshold; freed heap above 1 GiB is still returned
    return all(mallopt(opt, value) == 1 for opt, value in (
        (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20)))


def leave_core_for_http() -> int:
    """Intra-op threads = cores - 1 (at least 1) unless OMP_NUM_THREADS is set; -> the count."""
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > 1:
        torch.set_num_threads(torch.get_num_threads() - 1)
    return torch.get_num_threads()


def tune_for_cpu_serving(device: str | None) -> None:
    """Both settings when the engine will run on the CPU (`--device cpu`, or no CUDA)."""
    on_cpu = device == "cpu" if device else not torch.cuda.is_available()
    if not on_cpu:
        return
    kept = keep_freed_memory()
    log.info("CPU serving: %d intra-op thread(s), malloc keeps freed memory: %s", leave_core_for_http(), kept)
