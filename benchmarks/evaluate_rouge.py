"""Resolution of the reference-based protocol: ROUGE-L of sampled answers over seeds, with paired 95% CIs.

Usage:
    python benchmarks/evaluate_rouge.py --teacher smollm2-135m-instruct --students prune=runs/p20 \\
        --out runs/rouge-bench [--sets dolly,self_instruct] [--dolly-heldout 300] [--seeds 10,20,30] \\
        [--max-new-tokens 256] [--batch-size 32] [--limit N] [--precision auto]

Runs `dadpo.evaluate.run_evaluate` (MiniLLM's decoding: temperature 1, top-p 1; no judge, no zero-shot) and
prints per set and model ROUGE-L mean ± std over seeds, the paired difference of every model from the
baseline (the first student) with its 95% CI and half-width, how that half-width shrinks with the number
of prompts and seeds (the first n prompts, the first k seeds), the degeneration diagnostics, and the wall
time of the whole run. Answers are cached in --out: a rerun only recomputes the statistics.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dadpo.decoding import DecodingConfig
from dadpo.evaluate import EvalConfig, run_evaluate
from dadpo.evaluate.answers import answer_file, model_slug
from dadpo.evaluate.reference import paired_difference, prompt_scores, seed_average
from dadpo.io import read_jsonl


def half_widths(out: str, config: EvalConfig, specs: dict[str, str], a: str, b: str, s: str) -> None:
    """Half-width of the paired CI of a − b on set `s` for the first n prompts and the first k seeds."""
    def scores(name: str) -> dict[int, dict[str, float]]:
        folder = Path(out) / "answers" / model_slug(name, specs[name])
        return {k: prompt_scores(read_jsonl(answer_file(folder, s, k, config))) for k in config.seeds}

    sa, sb = scores(a), scores(b)
    ids = list(sa[config.seeds[0]])
    for k in range(1, len(config.seeds) + 1):
        seeds = config.seeds[:k]
        ma, mb = seed_average({x: sa[x] for x in seeds}), seed_average({x: sb[x] for x in seeds})
        for n in sorted({80, 150, 200, 300, len(ids)}):
            if n <= len(ids):
                d = paired_difference({i: ma[i] for i in ids[:n]}, {i: mb[i] for i in ids[:n]})
                lo, hi = d["ci95"]
                print(f"  {k} seed(s), {n} prompts: {d['delta']:+.2f}, half-width {(hi - lo) / 2:.2f}")


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
    p.add_argument("--precision", default="auto", help=DecodingConfig.model_fields["precision"].description)
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
                half_widths(args.out, config, {"teacher": args.teacher, **students}, c["a"], c["b"], s)
    with open(f"{args.out}/summary.json", "w") as f:
        json.dump({"seconds": took, "comparisons": res["comparisons"],
                   "models": {n: {"rouge": {s: {k: v for k, v in r.items() if k != "prompts"}
                                            for s, r in m["rouge"].items()},
                                  "diagnostics": m["diagnostics"]} for n, m in models.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
