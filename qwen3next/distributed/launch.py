"""Start tensor parallelism from rank 0 (the calling process): check the config splits, spawn
ranks 1..N-1 (worker.py), join the group, load rank 0's shard, wait for every worker's "ready",
and hand back a DriverModel. Any rank failing to start stops them all with one error line.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import torch
import torch.multiprocessing as mp

from qwen3next.config import ModelConfig

from .sharding import check_divisible


_WORKER_NAME = "qwen3next-tp"
_MAIN_GUARD_HINT = ('; a script that starts tensor parallelism when it is imported needs its engine under '
                    '`if __name__ == "__main__":` (the workers are spawned processes, which import it again)')


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_workers(procs: list, conns: list, ready: set) -> None:
    """RuntimeError naming the first worker that died or reported a start-up error; ranks that said
    "ready" are added to `ready`."""
    for rank, (p, conn) in enumerate(zip(procs, conns), start=1):
        if rank not in ready and conn.poll():
            try:
                kind, msg = conn.recv()
            except EOFError:  # it exited without a word (killed, or a crash in native code)
                kind, msg = "gone", None
            if kind == "error":
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start: {msg}")
            if kind == "ready":
                ready.add(rank)
        if not p.is_alive():
            p.join()
            hint = "; its error is above" + _MAIN_GUARD_HINT if p.exitcode == 1 else ""
            raise RuntimeError(f"tensor-parallel rank {rank} exited during start-up (code {p.exitcode}){hint}")


def _join_group(procs: list, conns: list, ready: set, size: int, init_method: str, device: torch.device,
                timeout_s: float) -> None:
    """Rank 0's init_tp, watching the workers meanwhile: the rendezvous waits for every rank (the
    gloo control group up to its year-long timeout), so a worker that dies or fails before joining
    must end the wait here (seen on 2 H200s: a worker gone before joining left rank 0 hanging)."""
    from .parallel_state import init_tp

    failed: list = []

    def join() -> None:
        try:
            init_tp(0, size, init_method, device, timeout_s)
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
            failed.append(e)

    t = threading.Thread(target=join, name="tp-join", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.2)
        # (a raise leaves the thread waiting in the rendezvous until its timeout; nothing else does)
        _check_workers(procs, conns, ready)
    if failed:
        raise failed[0]


def _wait_ready(procs: list, conns: list, ready: set, timeout_s: float) -> None:
    """Every worker said "ready"; else RuntimeError naming the first rank that failed."""
    deadline = time.monotonic() + timeout_s
    while len(ready) < len(procs):
        _check_workers(procs, conns, ready)
        missing = min(set(range(1, len(procs) + 1)) - ready, default=None)
        if missing is not None and time.monotonic() > deadline:
            raise RuntimeError(f"tensor-parallel rank {missing} did not start within {timeout_s:.0f} s")
        time.sleep(0.05)


def start(model_dir: str, size: int, dtype: torch.dtype, device: torch.device, with_mtp: bool,
          timeout_s: float = 600.0, hf_overrides: dict | None = None, load_format: str = "auto"):
    """-> (DriverModel around rank 0's shard, ModelConfig). device: cpu, or cuda (rank r on cuda:r)."""
    from qwen3next.loader import load_model

    from .driver import DriverModel
    from .parallel_state import destroy_tp

    if mp.current_process().name.startswith(_WORKER_NAME):
        # a spawned worker imports the caller's main module before running: this start() is that import
        raise RuntimeError("tensor parallelism started again inside its own worker" + _MAIN_GUARD_HINT)
    cfg = ModelConfig.from_dir(model_dir, hf_overrides)
    check_divisible(cfg, size)
    if device.type == "cuda":
        if torch.cuda.device_count() < size:
            raise ValueError(f"tensor_parallel_size ({size}) exceeds the {torch.cuda.device_count()} visible GPUs")
        device = torch.device("cuda:0")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # the ranks share the cores: N ranks of all the threads each spin on each other's cores
        # (2 cores, 2 ranks of 2 threads: 770 ms a tiny decode step, against 24 ms at 1 each)
        threads = max(1, threads // size)
        torch.set_num_threads(threads)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for rank in range(1, size):
        parent_end, child_end = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker_entry, name=f"{_WORKER_NAME}{rank}", daemon=True,
                        args=(rank, size, init_method, model_dir, dtype, device.type, with_mtp, child_end,
                              os.getpid(), timeout_s, threads, hf_overrides, load_format))
        p.start()
        procs.append(p)
        conns.append(parent_end)
    ready: set = set()
    try:
        if device.type == "cuda":  # (the current device is per thread: _join_group sets it in its own)
            torch.cuda.set_device(device)
        _join_group(procs, conns, ready, size, init_method, device, timeout_s)
        model, cfg = load_model(model_dir, dtype=dtype, device=device, with_mtp=with_mtp, progress=False,
                                hf_overrides=hf_overrides, load_format=load_format)
        _wait_ready(procs, conns, ready, timeout_s)
    except BaseException:
        for p in procs:
            p.kill()
            p.join()
        destroy_tp()
        raise
    return DriverModel(model, procs), cfg


def _worker_entry(*args) -> None:
    from .worker import worker_main

    worker_main(*args)
