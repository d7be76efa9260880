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
