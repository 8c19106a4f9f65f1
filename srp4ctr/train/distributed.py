"""DistributedDataParallel plumbing for ``torchrun`` (gloo on CPU, nccl on GPU).

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) every helper is a no-op and the
world has one rank, so the training code has a single path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device: str = "cpu") -> World:
    """Join the process group started by ``torchrun``; a single-rank world otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return World(rank=rank, size=size, local_rank=local_rank)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_mean(world: World, value: float) -> float:
    if not world.distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world.size


def gather_objects(world: World, obj):
    """Every rank's ``obj`` as a list in rank order (``[obj]`` without a process group)."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(world: World, obj, src: int = 0):
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
