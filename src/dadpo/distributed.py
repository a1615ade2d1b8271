"""The process group a command runs in under `torchrun` / `accelerate launch` (one process: rank 0 of 1).

torch.distributed is the engine: `init_from_env` joins the group that the launcher's environment describes
(RANK, WORLD_SIZE, MASTER_ADDR/PORT; gloo on CPU, nccl on CUDA, each rank on its LOCAL_RANK device), and the
work that is not the Trainer's (answer generation so far) splits prompts across ranks with `shard`, meeting
at `barrier` before the main process merges and writes.
"""

from __future__ import annotations

import os


def init_from_env() -> None:
    """Join the process group the launcher set up, if it started more than one process."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait for every process (a no-op in one process)."""
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        dist.barrier()


def shard(items: list, rank: int, world: int) -> list:
    """This rank's share of `items`: every world-th one from position `rank`, so shares differ by at most
    one item; an answer does not depend on the rank that makes it (per-prompt seeds)."""
    return items[rank::world]
