"""Sharding helpers of `dadpo.distributed` (the recipe under two processes: tests/test_recipe_runs.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dadpo.distributed import interleave, shard, unshard


def test_interleave_restores_the_order_shard_split():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 3] and interleave(parts) == items
    assert interleave([shard(items[:1], r, 2) for r in range(2)]) == items[:1]  # a process with nothing to do
    assert interleave([[], []]) == [] and unshard(items) == items  # one process: the identity


@pytest.mark.slow
def test_recover_forward_under_fsdp2_gives_the_unsharded_gradients():
    """FSDP2 (torch's fully_shard, what accelerate's FSDP config builds on GPUs) across two CPU processes:
    recover's losses read the tied output layer after the wrapped forward, outside any FSDP unit's own
    forward; its gradient and every other must still be the whole batch's. accelerate enables FSDP only on
    GPU back-ends (on CPU it silently runs DDP), so this drives torch directly."""
    import os
    import subprocess
    import sys

    from conftest import free_port

    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__).with_name(
                            "fsdp_worker.py"))], env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    found = re.search(r"world 2: worst relative gradient difference (\S+)", r.stdout)
    assert found and float(found[1]) < 1e-5, r.stdout
