"""The process group a command runs in under `torchrun` / `accelerate launch` (one process: rank 0 of 1).

torch.distributed is the engine: `init_from_env` joins the group that the launcher's environment describes
(RANK, WORLD_SIZE, MASTER_ADDR/PORT; gloo on CPU, nccl on CUDA, each rank on its LOCAL_RANK device). The
Trainer spreads training itself (DDP/FSDP); the rest of a run follows two patterns:
- work split by prompt (answers, scores, held-out metrics): every rank takes its `shard`, the results meet
  by `gather` (or in per-rank files), and the main process merges and writes;
- work done once (pruning, perplexity, reports, every manifest): the main process does it while the others
  wait at `barrier`, then read what it wrote.
Every rank must take the same branches so that the collectives line up: a decision that rests on the file
system (is this step already cached?) is the main process's, handed to all by `agree`.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

#: how long a process waits at a collective: the others may be pruning or scoring perplexity on the main
#: process for a long while (torchrun still stops the group at once when a process fails)
TIMEOUT = timedelta(hours=6)


def init_from_env() -> None:
    """Join the process group the launcher set up, if it started more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    rank, world = rank_and_world()
    log = logging.getLogger("dadpo")
    log.info("rank %d of %d: joined the process group (%s)", rank, world, backend)
    if rank > 0:  # one process tells the story
        log.setLevel(logging.WARNING)


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


def agree(value):
    """The main process's `value`, on every process."""
    import torch.distributed as dist

    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list:
    """Every process's `value`, in rank order, on every process."""
    import torch.distributed as dist

    world = rank_and_world()[1]
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def on_main(make):
    """`make()` on the main process while the others wait; its result on every process (it must not itself
    use a collective)."""
    value = make() if is_main() else None
    return agree(value)


def unshard(local: list) -> list:
    """The inverse of `shard`: every process's share put back in the original order, on every process."""
    return interleave(gather(local))


def interleave(parts: list[list]) -> list:
    """Rank-ordered `shard`s back into one list: item k of rank r was item r + k·world."""
    return [p[k] for k in range(max(map(len, parts), default=0)) for p in parts if k < len(p)]
