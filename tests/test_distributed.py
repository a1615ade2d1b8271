"""Sharding helpers of `dadpo.distributed` (the recipe under two processes: tests/test_recipe_runs.py)."""

from __future__ import annotations

from dadpo.distributed import interleave, shard, unshard


def test_interleave_restores_the_order_shard_split():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 3] and interleave(parts) == items
    assert interleave([shard(items[:1], r, 2) for r in range(2)]) == items[:1]  # a process with nothing to do
    assert interleave([[], []]) == [] and unshard(items) == items  # one process: the identity
