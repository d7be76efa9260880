"""Tensor-parallel state of this process: rank, world size and the two process groups.

`device_group` carries the model's collectives (NCCL on GPUs, gloo on CPU); `cpu_group` (always
gloo) carries the step messages rank 0 broadcasts to the workers. Layers read `tp_size()` /
`tp_rank()` when they are built: with no group initialised they are 1 / 0 and nothing changes.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger("qwen3next.distributed")


@dataclass
class TPState:
    rank: int
    size: int
    device: torch.device
    device_group: object
    cpu_group: object
    aborted: bool = False  # abort_device_group ran


_STATE: TPState | None = None


def tp_size() -> int:
    return 1 if _STATE is None else _STATE.size


def tp_rank() -> int:
    return 0 if _STATE is None else _STATE.rank


def tp_state() -> TPState:
    if _STATE is None:
        raise RuntimeError("tensor parallelism is not initialised in this process")
    return _STATE


@contextlib.contextmanager
def single_rank():
    """tp_size() == 1 inside (a model built here has the whole tensors' shapes); the group stays."""
    global _STATE
    saved, _STATE = _STATE, None
    try:
        yield
    finally:
        _STATE = saved


def init_tp(rank: int, size: int, init_method: str, device: torch.device,
            timeout_s: float = 300.0) -> TPState:
    """Join the group of `size` ranks. Collectives in the model give up after `timeout_s`; the
    control group waits for rank 0's next step indefinitely (an idle server sends nothing)."""
    global _STATE
    if _STATE is not None:
        raise RuntimeError("tensor parallelism is already running in this process: shut the other "
                           "tensor-parallel LLM down first (llm.llm_engine.shutdown(), or del llm)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, world_size=size, rank=rank,
                            timeout=datetime.timedelta(seconds=timeout_s))
    ranks = list(range(size))
    device_group = dist.group.WORLD
    # a year: workers block here between requests; a dead rank 0 is noticed by the parent watchdog
    cpu_group = dist.new_group(ranks, backend="gloo", timeout=datetime.timedelta(days=365))
    _STATE = TPState(rank, size, device, device_group, cpu_group)
    return _STATE


def abort_device_group() -> None:
    """Abort the NCCL communicator (from any thread): its collectives, also those spinning on the
    GPU for a dead peer, end with an error. No-op on gloo or without a group."""
    st = _STATE
    if st is None or st.device.type != "cuda":
        return
    try:
        st.device_group.abort()  # (WORLD of the nccl init: its one backend is NCCL)
        st.aborted = True
    except Exception as e:  # noqa: BLE001 - best effort: the collective timeout still ends the wait
        logger.warning("could not abort the NCCL communicator: %s", e)


def destroy_tp() -> None:
    """Leave the group (idempotent); a later init_tp may start a new one."""
    global _STATE
    if _STATE is None:
        return
    st, _STATE = _STATE, None
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - an aborted communicator may refuse; the process can go on
            if not st.aborted:
                raise
            logger.warning("destroying the aborted process group: %s", e)
