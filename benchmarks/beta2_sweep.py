"""β2 and margin sweep of daDPO on validation data (issue 15): which settings make the teacher term count.

Usage:
    python benchmarks/beta2_sweep.py --data-dir ../shared/data --out runs/beta2-sweep \\
        [--train-prompts 160] [--val-prompts 64] [--betas 0.001,0.003,0.01,0.03,0.1] [--mean-betas 0.1,1] \\
        [--set KEY.PATH=VALUE ...]

One `dadpo bench` of the demo recipe (prune, dSFT, teacher and student answers, scores: all shared), with
methods dpo (dDPO, β2 = 0) and daDPO at every β2 with `margin: sum`, then dDPO and daDPO at `--mean-betas`
with `margin: mean` (so the margin's own effect is separate from the teacher's). Validation = the Dolly
rows right after the 300 that evaluation holds out, which recover keeps out of training
(`recover.eval_prompts`): its held-out teacher-response NLL and pair accuracies, and ROUGE-L of sampled
answers (3 seeds) on the same rows, written to OUT/validation.jsonl for the evaluate stage.
No test set (Dolly's first 300 rows, Vicuna-bench, Self-Instruct) is read. Prints one row per
method and writes OUT/sweep.json; a rerun reuses every finished stage.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-prune20-dadpo.yaml"
HELD_OUT = 300  # Dolly rows the recipe's evaluation holds out (never read here)


def validation_file(data_dir: Path, out: Path, n: int) -> Path:
    """Dolly rows HELD_OUT … HELD_OUT + n (recover's held-out prompts) with their references, as JSONL."""
    rows = (data_dir / "dolly15k" / "databricks-dolly-15k.jsonl").read_text().splitlines()[HELD_OUT: HELD_OUT + n]
    path = out / "validation.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"val{HELD_OUT + i}", **json.loads(r)}) + "\n"
                            for i, r in enumerate(rows)))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--train-prompts", type=int, default=160)
    p.add_argument("--val-prompts", type=int, default=64)
    p.add_argument("--betas", default="0.001,0.003,0.01,0.03,0.1", help="β2 values with margin sum")
    p.add_argument("--mean-betas", default="0.1,1", help="β2 values with margin mean")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    out = Path(args.out)
    val = validation_file(Path(args.data_dir), out, args.val_prompts)
    mean_betas = [b for b in args.mean_betas.split(",") if b]
    variants = (["dpo"] + [f"dadpo@beta2={b}" for b in args.betas.split(",")]
                + (["dpo@margin=mean"] if mean_betas else [])  # what the mean margin does without the teacher
                + [f"dadpo@margin=mean@beta2={b}" for b in mean_betas])
    bench = ["bench", str(RECIPE), "--methods", ",".join(["none", "dsft", *variants]), "--out", str(out)]
    sets = [f"data_dir={args.data_dir}", f"recover.train_prompts={args.train_prompts}",
            f"recover.eval_prompts={args.val_prompts}", f"evaluate.sets=[validation={val}]",
            f"evaluate.limit={args.val_prompts}", "evaluate.baseline=dpo", "evaluate.judge=null",
            "evaluate.tasks=[]", "evaluate.ppl_corpora=[]", *args.overrides]
    argv = bench + [a for s in sets for a in ("--set", s)]
    print("dadpo " + " ".join(shlex.quote(a) for a in argv), flush=True)
    from dadpo.cli import main as dadpo

    t0 = time.time()
    if dadpo(argv) != 0:
        sys.exit(1)
    rows = {r["method"]: r for r in json.loads((out / "bench" / "bench.json").read_text())["rows"]}
    results = json.loads((out / "bench" / "evaluate" / "results.json").read_text())
    t_rouge, t_diag = results["teacher"]["rouge"]["validation"], results["teacher"]["diagnostics"]["validation"]
    print(f"teacher: val ROUGE-L {t_rouge['mean']:.2f} ± {t_rouge['std']:.2f}, loops {t_diag['loops']:.1f}%")
    sweep = []
    print(f"\nwall {(time.time() - t0) / 60:.1f} min (finished stages reused)\n")
    print("| method | val NLL | reward acc | objective acc | saturated start → end | median u start | "
          "val ROUGE-L ± std | Δ vs dpo [95% CI] | loops % |\n|---|---|---|---|---|---|---|---|---|")
    for name in ["none", "dsft", *variants]:
        m = json.loads((out / "bench" / f"recover-{name}" / "metrics.json").read_text()) if name != "none" else {}
        final, term = m.get("final", {}), m.get("teacher_term", {})
        nll = final.get("nll", m.get("start", {}).get("nll"))
        if name == "none":
            nll = json.loads((out / "bench" / "recover-dsft" / "metrics.json").read_text())["start"]["nll"]
        r = rows[name]["rouge"].get("validation", {})
        d = rows[name]["rouge_delta"].get("validation")
        loops = results["students"][name]["diagnostics"]["validation"]["loops"]
        row = {"method": name, "nll": nll, "reward_acc": final.get("reward_acc"), "loops": loops,
               "objective_acc": final.get("objective_acc"), "teacher_term": term, "rouge": r, "rouge_delta": d}
        sweep.append(row)
        fmt = lambda x, k=3: "–" if x is None else f"{x:.{k}f}"  # noqa: E731
        sat = (f"{term['start']['saturated']:.2f} → {term['end']['saturated']:.2f}" if "end" in term else "–")
        delta = f"{d['delta']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d else "–"
        print(f"| {name} | {fmt(nll, 4)} | {fmt(row['reward_acc'], 2)} | {fmt(row['objective_acc'], 2)} | {sat} | "
              f"{fmt(term.get('start', {}).get('u_q50'), 2)} | {fmt(r.get('mean'), 2)} ± {fmt(r.get('std'), 2)} | "
              f"{delta} | {loops:.1f} |")
    (out / "sweep.json").write_text(json.dumps({"command": argv, "rows": sweep}, indent=1))


if __name__ == "__main__":
    main()
