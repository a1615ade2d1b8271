"""Which examples share a batch. Every row of a batch is right-padded to its longest prompt + response, so
batches of similar lengths waste less compute: `recover.group_by_length` orders training examples in
length-sorted groups (the order still random, seeded per epoch) and scores them in length order.

The Trainer's own `group_by_length` sampler draws its order from the global RNG, which a resumed run cannot
reproduce; `LengthGroupedOrder` draws it from (seed, epoch) alone, so a killed run resumes on the same batches.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def example_length(ex: dict) -> int:
    """Tokens in an example's collated rows: its prompt plus its longer response."""
    return len(ex["prompt_ids"]) + max(len(ex[k]) for k in ("chosen_ids", "rejected_ids") if k in ex)


class LengthGroupedOrder(Sampler[int]):
    """Indices in transformers' length-grouped order (a random permutation cut into mega-batches of up to 50
    batches, each sorted by length, longest first), from a generator seeded by `seed + epoch`."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch, resumed ones included (`trainer._EpochOfOrders`)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def in_length_order(examples: list[dict]) -> list[dict]:
    """`examples` sorted by `example_length`, longest first (a batch too large for memory fails at once), for
    forward passes whose results are kept per example."""
    return sorted(examples, key=example_length, reverse=True)
