"""Process-group helpers for code launched by ``torchrun`` (or run inline as one process)."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> World:
    """Join the process group torchrun set up (NCCL with CUDA, else gloo); one process: no group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world_size == 1:
        return World(rank, local_rank, 1, None)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return World(rank, local_rank, world_size, backend)


def rank_log_path(log_dir: str | os.PathLike) -> Path:
    """``{log_dir}/run-{RANK}.log``: one log per rank, as in the seed (see :mod:`refrag`)."""
    return Path(log_dir) / f"run-{os.environ.get('RANK', '0')}.log"


def hello(out: str | os.PathLike) -> dict:
    """The seed's minimal distributed app: every rank says hello, rank 0 records the all-reduce."""
    world = init_distributed()
    print(
        f"hello from rank {world.rank}/{world.world_size} on {socket.gethostname()} (backend {world.backend})"
    )
    value = torch.tensor([float(world.rank + 1)])
    if world.world_size > 1:
        if world.backend == "nccl":
            value = value.cuda()
        dist.all_reduce(value)
    result = asdict(world) | {
        "all_reduce_sum": value.item(),
        "expected_sum": world.world_size * (world.world_size + 1) / 2,
    }
    print(f"all_reduce(rank + 1) = {result['all_reduce_sum']}")
    if world.is_main:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result
