"""Rank 0's worker watcher (GPUs): a worker that dies aborts the NCCL communicator, so a collective
spinning on the dead peer ends in an error instead of a hang; a shutdown's own kills do not."""

from __future__ import annotations

import threading

from qwen3next.distributed import driver


class _Proc:
    def __init__(self):
        self.alive = True

    def is_alive(self) -> bool:
        return self.alive


def _watch(monkeypatch, stop_first: bool) -> list:
    aborted = []
    monkeypatch.setattr(driver, "abort_device_group", lambda: aborted.append(True))
    procs, stopping = [_Proc(), _Proc()], threading.Event()
    t = threading.Thread(target=driver._abort_when_a_worker_dies, args=(procs, stopping, 0.01))
    t.start()
    if stop_first:
        stopping.set()  # what stop_workers does before it kills anything
    procs[1].alive = False
    t.join(5)
    assert not t.is_alive()
    return aborted


def test_a_dying_worker_aborts_the_communicator(monkeypatch):
    assert _watch(monkeypatch, stop_first=False) == [True]


def test_shutdown_kills_abort_nothing(monkeypatch):
    assert _watch(monkeypatch, stop_first=True) == []


def test_rank0_start_up_ends_when_a_worker_dies_before_joining():
    """(On 2 H200s a worker gone before the rendezvous left rank 0 waiting in it for good.)"""
    import multiprocessing
    import socket
    import time

    import torch

    from qwen3next.distributed import launch, parallel_state

    class Dead:
        exitcode = -9

        def is_alive(self) -> bool:
            return False

        def join(self, *a) -> None:
            pass

    read, write = multiprocessing.Pipe(duplex=False)
    write.close()  # it exited without a word
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    try:
        launch._join_group([Dead()], [read], set(), 2, f"tcp://127.0.0.1:{port}", torch.device("cpu"), 3.0)
    except RuntimeError as e:
        assert "rank 1 exited during start-up (code -9)" in str(e)
    else:
        raise AssertionError("no error")
    assert time.monotonic() - t0 < 2
    for t in threading.enumerate():  # the rendezvous thread gives up at its 3 s timeout, joining nothing
        if t.name == "tp-join":
            t.join(10)
    assert parallel_state.tp_size() == 1 and not torch.distributed.is_initialized()
