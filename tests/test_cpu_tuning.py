"""qwen3next/cpu_tuning.py: malloc keeps freed tensor memory (no page faults on reuse) and the
serving thread count leaves a core to HTTP. Each case runs in a subprocess: both settings are
process-wide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "1":
    from qwen3next.cpu_tuning import keep_freed_memory
    assert keep_freed_memory()
def rounds(n):
    for _ in range(n):
        live = [torch.ones((1 + i % 7) << 18) for i in range(40)]  # 1-7 MiB each, ~160 MiB at once
        del live
rounds(1)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(3)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _run(code: str, *args: str, env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_freed_tensor_memory_is_reused_without_page_faults():
    plain, tuned = int(_run(_FAULTS, "0")), int(_run(_FAULTS, "1"))
    # 3 rounds x ~160 MiB: untuned glibc unmaps and faults most of it back in (~10^5 faults)
    assert tuned * 4 < plain, (tuned, plain)


def test_serving_threads_leave_a_core():
    code = ("import torch; torch.set_num_threads(3); from qwen3next.cpu_tuning import tune_for_cpu_serving;"
            "tune_for_cpu_serving('cpu'); print(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert _run(code, env=env) == "2"
    assert _run(code, env={**env, "OMP_NUM_THREADS": "3"}) == "3"  # an explicit setting wins
    gpu = ("import torch; torch.set_num_threads(3); from qwen3next.cpu_tuning import tune_for_cpu_serving;"
           "tune_for_cpu_serving('cuda'); print(torch.get_num_threads())")
    assert _run(gpu, env=env) == "3"
