"""A script that builds a tensor-parallel LLM at import time (no `if __name__ == "__main__":`):
each spawned worker imports the script again and reaches the engine's start once more. That start
now stops at once in the worker with a line saying what to do, and rank 0 names the rank and the
fix (was a worker traceback deep in multiprocessing and 'rank 1 exited during start-up (code 1)')."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unguarded_script_says_to_guard_its_main(tiny_ckpt, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        from qwen3next import LLM
        LLM(model={tiny_ckpt!r}, tensor_parallel_size=2, dtype="float32", device="cpu", max_model_len=256,
            max_num_seqs=2, max_num_batched_tokens=64, kv_cache_memory_bytes=32 << 20)
    """))
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: tensor-parallel rank 1 exited during start-up (code 1)")
    assert 'if __name__ == "__main__":' in last
    assert "tensor parallelism started again inside its own worker" in r.stderr  # the worker's own line
