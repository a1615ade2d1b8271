"""Benchmark: LLM-Pruner's seven zero-shot tasks (lm-eval, local data) on a model, with wall time.

python benchmarks/evaluate_zeroshot.py --limit 200 --out /tmp/zs200.json
python benchmarks/evaluate_zeroshot.py --out /tmp/zs_full.json          # full splits
python benchmarks/evaluate_zeroshot.py --tasks hellaswag --cache /tmp/zs/hs --out /tmp/hs.json  # resumable
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from dadpo.evaluate.zeroshot import TASKS, run_zeroshot  # noqa: E402
from dadpo.io import atomic_write_json  # noqa: E402
from dadpo.models import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--limit", type=int, help="items per task (default: full splits)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--cache", help="lm-eval request cache prefix for this model: a killed or split run resumes")
    args = p.parse_args()
    import torch

    model, tok = load_model(args.model)
    t0, c0 = time.perf_counter(), time.process_time()
    res = run_zeroshot(
        model,
        tok,
        args.tasks.split(","),
        data_dir=args.data_dir,
        limit=args.limit,
        batch_size=args.batch_size,
        cache=args.cache,
    )
    wall = time.perf_counter() - t0
    out = {
        "model": args.model,
        "limit": args.limit,
        "wall_s": round(wall, 1),
        "cpu_s": round(time.process_time() - c0, 1),
        "threads": torch.get_num_threads(),
        "results": res,
    }
    atomic_write_json(args.out, out)
    for task, row in res.items():
        print(f"{task:14s} n={row['n']:6d} acc={row['acc']:.4f} acc_norm={row.get('acc_norm', float('nan')):.4f}")
    print(f"wall {wall:.1f}s")


if __name__ == "__main__":
    main()
