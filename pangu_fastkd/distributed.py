"""torch.distributed set-up for jobs launched with or without ``torchrun``.

``torchrun`` exports ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a plain ``python -m ...`` has
none of them and runs as the only rank, without initialising a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "backend_for", "init_distributed"]


def backend_for(device: torch.device) -> str:
    """The collective backend for a device type: hccl (Ascend NPU), nccl (CUDA), else gloo."""
    return {"npu": "hccl", "cuda": "nccl"}.get(device.type, "gloo")


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes shared files (manifests, checkpoints, reports)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Waits for every rank (no-op when running alone)."""
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` over ranks (a copy; the input is left as it is)."""
        out = value.clone()
        if self.enabled:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


def init_distributed(device: torch.device | str = "cpu") -> DistributedContext:
    """Joins the process group described by torchrun's environment, if there is one.

    Returns the context; with ``WORLD_SIZE`` unset or 1 no process group is created.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend_for(torch.device(device)))
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank)
