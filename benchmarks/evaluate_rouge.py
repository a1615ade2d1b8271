"""Resolution of the reference-based protocol: ROUGE-L of sampled answers over seeds, with paired 95% CIs.

Usage:
    python benchmarks/evaluate_rouge.py --teacher smollm2-135m-instruct --students prune=runs/p20 \\
        --out runs/rouge-bench [--sets dolly,self_instruct] [--dolly-heldout 300] [--seeds 10,20,30] \\
        [--max-new-tokens 256] [--batch-size 32] [--limit N] [--precision auto]

Runs `dadpo.evaluate.run_evaluate` (MiniLLM's decoding: temperature 1, top-p 1; no judge, no zero-shot) and
prints per set and model ROUGE-L mean ± std over seeds, the paired difference of every model from the
baseline (the first student) with its 95% CI and half-width, the degeneration diagnostics, and the wall
time of the whole run. Answers are cached in --out: a rerun only recomputes the statistics.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from dadpo.evaluate import EvalConfig, run_evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--students", required=True, help="NAME=SPEC, comma-separated; the first is the baseline")
    p.add_argument("--out", required=True)
    p.add_argument("--sets", default="dolly,self_instruct")
    p.add_argument("--dolly-heldout", type=int, default=300)
    p.add_argument("--seeds", default="10,20,30")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int)
    p.add_argument("--precision", default="auto", help="auto, model or bfloat16 (bf16 on a CPU without AMX: "
                   "reproducible at this batch size, not across batch sizes)")
    args = p.parse_args()
    students = dict(item.split("=", 1) for item in args.students.split(","))
    config = EvalConfig.model_validate({
        "sets": args.sets.split(","), "dolly_heldout": args.dolly_heldout, "limit": args.limit,
        "seeds": [int(s) for s in args.seeds.split(",")], "judge": None,
        "generation": {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                       "precision": args.precision},
    })
    t0 = time.time()
    res = run_evaluate(students, args.teacher, args.out, config)
    took = time.time() - t0
    models = {"teacher": res["teacher"], **res["students"]}
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; wall {took / 60:.1f} min (incl. cached answers)")
    for s in config.sets:
        print(f"\n## {s}")
        for name, m in models.items():
            r, d = m["rouge"].get(s), m["diagnostics"][s]
            if r:
                print(f"{name:>10}: ROUGE-L {r['mean']:.2f} ± {r['std']:.2f} (seeds {r['per_seed']}), "
                      f"95% CI [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}], n={r['n']}")
            print(f"{'':>10}  tokens {d['mean_tokens']:.0f}, hit cap {d['hit_cap']:.1f}%, distinct-1/2 "
                  f"{d['distinct_1']:.1f}/{d['distinct_2']:.1f}%, loops {d['loops']:.1f}% of {d['answers']}")
        for c in res["comparisons"]:
            if c["set"] == s:
                lo, hi = c["ci95"]
                print(f"{c['a']} − {c['b']}: {c['delta']:+.2f} [{lo:+.2f}, {hi:+.2f}], half-width "
                      f"{(hi - lo) / 2:.2f}, n={c['n']}")
    with open(f"{args.out}/summary.json", "w") as f:
        json.dump({"seconds": took, "comparisons": res["comparisons"],
                   "models": {n: {"rouge": {s: {k: v for k, v in r.items() if k != "prompts"}
                                            for s, r in m["rouge"].items()},
                                  "diagnostics": m["diagnostics"]} for n, m in models.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
