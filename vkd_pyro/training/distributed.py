"""Several processes (GPUs, nodes) through PyTorch's own engine, torch.distributed.

`torchrun --nproc_per_node=K -m vkd_pyro train ...` starts K processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; :func:`init_from_env` joins them into one process
group (NCCL on GPUs, one GPU per process: cuda:LOCAL_RANK; gloo on the CPU). Without those
variables (WORLD_SIZE unset or 1) every function here is the single-process identity, so the
training loop has one code path.

What the training loop does with it (vkd_pyro.training.loop):
- the module is wrapped in DistributedDataParallel: its forward is the loss, whose gradients DDP
  averages across processes;
- every process computes the same global batches and trains on its share of each
  (vkd_pyro.data.sampling); the loss of a share is scaled so that the averaged gradient is the
  gradient of the global batch's mean loss;
- the loss terms are summed across processes every step (on the device), validation and test
  predictions are computed on a shard per process and gathered (:func:`gather_predictions`), so
  every process takes the same early-stopping decision;
- only rank 0 writes files and prints.
"""

from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from vkd_pyro import logs


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among world_size processes, and its local rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CONTEXT = DistContext()


def context() -> DistContext:
    """The process group this process joined (a single-process context when none)."""
    return _CONTEXT


def say(message: str) -> None:
    """Log a line (`vkd_pyro.logs`: the console and the run's run.log), only on rank 0 when several
    processes train."""
    if _CONTEXT.is_main:
        logs.info(message)


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_from_env(device: torch.device, timeout_minutes: float = 30.0) -> tuple[DistContext, torch.device]:
    """Join the process group that torchrun's environment describes; return it and this process's device.

    Single process (WORLD_SIZE unset or 1): nothing happens. Several: backend `nccl` when `device`
    is cuda (this process then uses cuda:LOCAL_RANK), `gloo` on the CPU.
    """
    global _CONTEXT
    world = env_world_size()
    if world <= 1:
        _CONTEXT = DistContext()
        return _CONTEXT, device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():  # once per process: later runs (a sweep) reuse the group
        options = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=timedelta(minutes=timeout_minutes), **options)
        atexit.register(_destroy)
    _CONTEXT = DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)
    return _CONTEXT, device


def shutdown() -> None:
    """The end of a run. The process group itself stays (another run in this process, e.g. a
    sweep's next, reuses it: joining again on the same port would hang); it is destroyed at exit."""
    global _CONTEXT
    _CONTEXT = DistContext()


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if _CONTEXT.enabled:
        dist.barrier()


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. fills a cache); the others then run it (and read the cache)."""
    if _CONTEXT.enabled and not _CONTEXT.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if _CONTEXT.enabled and _CONTEXT.is_main:
            dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place: the sum (or max, min) of `tensor` over the processes. No host synchronisation."""
    if _CONTEXT.enabled:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def all_gather_objects(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process (picklable objects)."""
    if not _CONTEXT.enabled:
        return [obj]
    out: list = [None] * _CONTEXT.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) to every process."""
    if _CONTEXT.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def gather_predictions(predict, split, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, labels) over a whole split, each process predicting positions rank, rank+K, ...

    `predict(dataset)` returns this process's (mean, std, labels) arrays for a dataset; the shards
    are gathered and put back in the split's order, on every process.
    """
    if not _CONTEXT.enabled:
        return predict(split)
    positions = np.arange(len(split))[_CONTEXT.rank::_CONTEXT.world_size]
    if len(positions):
        part = predict(torch.utils.data.Subset(split, positions.tolist()))
    else:
        empty = np.zeros((0, num_classes), dtype=np.float32)
        part = (empty, empty, empty)
    pieces = all_gather_objects((positions, *part))
    out = [np.zeros((len(split), num_classes), dtype=np.float32) for _ in range(3)]
    for where, *arrays in pieces:
        for target, array in zip(out, arrays):
            target[where] = array
    return out[0], out[1], out[2]
