"""The method comparison of issue 15: none / dSFT / token KD / dDPO / daDPO on the science recipe, with CIs.

Usage:
    python benchmarks/science_run.py --data-dir ../shared/data [--out runs/smollm2-135m-science]

Runs `dadpo bench recipes/smollm2-135m-science.yaml --methods none,dsft,kd,dpo,dadpo` (every finished stage
is reused, so a killed run resumes), then measures per prompt what the bench table does not, each cached
beside the run and reused on a rerun:
- held-out teacher-response NLL of every model (the teacher too) on recover's 64 held-out prompts, so that
  differences get paired bootstrap CIs over prompts;
- greedy answers (128 tokens, float32) to the evaluation sets, and the share that loops (the 20% prune's
  failure mode), with paired CIs.
Prints markdown tables (methods, paired comparisons, share of the prune's gap closed, wall time per stage)
and writes OUT/bench/science.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m-science.yaml"
METHODS = ["none", "dsft", "kd", "dpo", "dadpo"]
MODELS = ["teacher", *METHODS]
PAIRS = [("dsft", "none"), ("kd", "none"), ("dpo", "none"), ("dadpo", "none"), ("kd", "dsft"), ("dpo", "dsft"),
         ("dadpo", "dsft"), ("dadpo", "dpo")]
BOOTSTRAP = 2000


def bootstrap_ci(stat, n: int, seed: int = 0) -> list[float | None]:
    """95% percentile interval of `stat(idx)` over prompts resampled with replacement (resamples where the
    statistic is undefined, NaN, are left out; None when most are)."""
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, n)) for _ in range(BOOTSTRAP)], dtype=float)
    if np.isnan(values).mean() > 0.5:
        return [None, None]
    return [float(v) for v in np.nanpercentile(values, [2.5, 97.5])]


def wilson(k: int, n: int) -> list[float]:
    """95% Wilson interval of a share k/n, in percent."""
    if n == 0:
        return [math.nan, math.nan]
    p, z = k / n, 1.96
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [100 * (centre - half) / (1 + z * z / n), 100 * (centre + half) / (1 + z * z / n)]


def cached(path: Path, key: str, make):
    """`make()`, stored in `path` under `key` (the model's stamp): reused while the key matches."""
    if path.is_file() and (data := json.loads(path.read_text())).get("key") == key:
        return data["value"]
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "value": value}))
    tmp.replace(path)
    return value


def greedy_loops(spec: str, stamp: str, sets: dict, folder: Path) -> dict[str, dict[str, bool]]:
    """{set: {prompt id: loops}} of greedy float32 answers (128 new tokens) to every evaluation prompt."""
    from dadpo.decoding import GenerationConfig
    from dadpo.evaluate.reference import loops
    from dadpo.generation import generate_to_file
    from dadpo.models import load_model

    model, tok = load_model(spec)
    cfg = GenerationConfig(max_new_tokens=128, temperature=0.0, batch_size=32, precision="model")
    out = {}
    for name, records in sets.items():
        rows = generate_to_file(model, tok, records, cfg, folder / f"{name}.jsonl", model_name=stamp,
                                replace_stale=True)
        out[name] = {r["id"]: loops(r["response"]) for r in rows}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", default=str(ROOT / "runs" / "smollm2-135m-science"))
    args = p.parse_args()
    out, data_dir = Path(args.out).resolve(), str(Path(args.data_dir).resolve())
    argv = ["bench", str(RECIPE), "--methods", ",".join(METHODS), "--set", f"data_dir={data_dir}", "--out", str(out)]
    print("dadpo " + " ".join(shlex.quote(a) for a in argv), flush=True)
    from dadpo.cli import main as dadpo

    sys.argv = ["dadpo", *argv]  # what bench records as its command
    if dadpo(argv) != 0:
        sys.exit(1)

    from dadpo.data import load_prompts
    from dadpo.evaluate.answers import load_eval_sets
    from dadpo.io import read_jsonl
    from dadpo.models import model_stamp
    from dadpo.pipeline import read_manifest
    from dadpo.recipe import load_recipe
    from dadpo.recover.heldout import heldout_prompt_nll
    from dadpo.recover.pipeline import split_prompts
    from dadpo.reuse import content_key

    recipe = load_recipe(RECIPE, [f"data_dir={data_dir}"])
    bench = out / "bench"
    results = json.loads((bench / "evaluate" / "results.json").read_text())
    blocks = {"teacher": results["teacher"], **results["students"]}
    specs = {name: blocks[name]["spec"] for name in MODELS}
    _, heldout = split_prompts(load_prompts(recipe.prompts, data_dir=data_dir), recipe.recover, recipe.prompts)
    teacher_rows = {r["id"]: r["response"] for r in read_jsonl(bench / "recover-dsft" / "teacher.jsonl")}
    eval_cfg = recipe.evaluate.model_copy(update={"data_dir": data_dir})
    sets = load_eval_sets(eval_cfg)
    work = bench / "science"
    nll, loop = {}, {}
    lengths = (recipe.recover.max_prompt_len, recipe.recover.max_response_len)
    nll_inputs = content_key({"heldout": [(r.id, teacher_rows[r.id]) for r in heldout], "lengths": lengths})
    loop_inputs = content_key({s: [r.id for r in recs] for s, recs in sets.items()})
    for name in MODELS:
        stamp = model_stamp(specs[name])
        nll[name] = cached(work / f"nll-{name}.json", f"{stamp}:{nll_inputs}",
                           lambda s=specs[name]: heldout_prompt_nll(s, heldout, teacher_rows, recipe.recover))
        loop[name] = cached(work / f"loops-{name}.json", f"{stamp}:{loop_inputs}",
                            lambda s=specs[name], t=stamp, n=name: greedy_loops(s, t, sets, work / "greedy" / n))

    ids = [r.id for r in heldout]
    tokens = np.array([nll["teacher"][i][1] for i in ids])
    nll_of = {m: np.array([nll[m][i][0] for i in ids]) for m in MODELS}
    set_names = list(sets)
    loops_of = {m: {s: np.array([loop[m][s][r.id] for r in sets[s]], dtype=float) for s in set_names}
                for m in MODELS}
    rouge_of = {m: {s: np.array([blocks[m]["rouge"][s]["prompts"][r.id] for r in sets[s]]) for s in set_names}
                for m in MODELS}

    def pooled_nll(m, idx=slice(None)):
        return nll_of[m][idx].sum() / tokens[idx].sum()

    rows = []
    for m in MODELS:
        b = blocks[m]
        ppl = next(x for x in b["perplexity"] if x["corpus"] == "wikitext2")
        row = {"model": m, "params": b["params"], "nll": pooled_nll(m),
               "nll_ci95": bootstrap_ci(lambda i, m=m: pooled_nll(m, i), len(ids)),
               "ppl": ppl["ppl"], "ppl_ci95": ppl["ppl_ci95"], "ppl_windows": ppl["windows"]}
        for s in set_names:
            r = b["rouge"][s]
            row[f"rouge_{s}"] = {"mean": r["mean"], "std": r["std"], "per_seed": r["per_seed"]}
            k, n = int(loops_of[m][s].sum()), len(loops_of[m][s])
            row[f"loops_greedy_{s}"] = {"value": 100 * k / n, "ci95": wilson(k, n)}
            row[f"loops_sampled_{s}"] = b["diagnostics"][s]["loops"]
        rows.append(row)

    comparisons = []
    for a, b in PAIRS:
        c = {"a": a, "b": b}
        for s in set_names:
            d = rouge_of[a][s] - rouge_of[b][s]
            c[f"rouge_{s}"] = {"delta": float(d.mean()), "ci95": bootstrap_ci(lambda i, d=d: d[i].mean(), len(d))}
            dl = 100 * (loops_of[a][s] - loops_of[b][s])
            c[f"loops_greedy_{s}"] = {"delta": float(dl.mean()),
                                      "ci95": bootstrap_ci(lambda i, d=dl: d[i].mean(), len(dl))}
        dn = nll_of[a] - nll_of[b]
        c["nll"] = {"delta": float(dn.sum() / tokens.sum()),
                    "ci95": bootstrap_ci(lambda i, d=dn: d[i].sum() / tokens[i].sum(), len(ids))}
        comparisons.append(c)

    def gap(m, metric):  # share of (teacher − none) that m closes, with a bootstrap CI over prompts
        if metric == "nll":
            f = {x: (lambda i, x=x: pooled_nll(x, i)) for x in ("teacher", "none", m)}
            n = len(ids)
        else:
            kind, s = metric
            arr = (rouge_of if kind == "rouge" else loops_of)
            f = {x: (lambda i, x=x: arr[x][s][i].mean()) for x in ("teacher", "none", m)}
            n = len(arr[m][s])

        def share(i):
            den = f["teacher"](i) - f["none"](i)
            return 100 * (f[m](i) - f["none"](i)) / den if den else math.nan
        value = share(slice(None))
        return {"value": None if math.isnan(value) else value, "ci95": bootstrap_ci(share, n)}

    metrics = ["nll"] + [(k, s) for k in ("rouge", "loops") for s in set_names]
    gaps = {m: {("nll" if x == "nll" else f"{x[0]}_{x[1]}"): gap(m, x) for x in metrics} for m in METHODS[1:]}
    log_ppl = {r["model"]: math.log(r["ppl"]) for r in rows}  # on the log scale, like the NLL column
    ppl_gap = {m: 100 * (log_ppl[m] - log_ppl["none"]) / (log_ppl["teacher"] - log_ppl["none"])
               for m in METHODS[1:]}
    seconds = {d.name: read_manifest(d).get("seconds") for d in [out / "prune", *sorted(bench.iterdir())]
               if d.is_dir() and read_manifest(d)}
    report = {"command": "python benchmarks/science_run.py --data-dir DATA", "bench": argv, "rows": rows,
              "comparisons": comparisons, "gap_closed": gaps, "ppl_gap_closed": ppl_gap, "stage_seconds": seconds,
              "heldout_prompts": len(ids), "eval_prompts": {s: len(v) for s, v in sets.items()},
              "written": time.strftime("%FT%T%z")}
    tmp = bench / "science.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(bench / "science.json")
    print_tables(report, set_names)


def _ci(x: dict, digits: int = 1, sign: bool = False) -> str:
    f = f"{{:{'+' if sign else ''}.{digits}f}}".format
    lo, hi = x["ci95"]
    raw = x["delta"] if "delta" in x else x["value"]
    value = "–" if raw is None else f(raw)
    return f"{value} [{f(lo)}, {f(hi)}]" if lo is not None else f"{value} [undefined]"


def print_tables(report: dict, sets: list[str]) -> None:
    print("\n| model | params (M) | held-out NLL [95% CI] | " + " | ".join(
        f"{s} ROUGE-L ± std (seeds)" for s in sets) + " | " + " | ".join(
        f"{s} loops greedy % [95% CI]" for s in sets) + " | loops sampled % | WikiText-2 PPL [95% CI] |")
    print("|---" * (5 + 2 * len(sets)) + "|")
    for r in report["rows"]:
        nll = f"{r['nll']:.4f} [{r['nll_ci95'][0]:.4f}, {r['nll_ci95'][1]:.4f}]"
        rouge = " | ".join(f"{r[f'rouge_{s}']['mean']:.2f} ± {r[f'rouge_{s}']['std']:.2f}" for s in sets)
        loops = " | ".join(_ci(r[f"loops_greedy_{s}"], 0) for s in sets)
        sampled = " / ".join(f"{r[f'loops_sampled_{s}']:.1f}" for s in sets)
        ppl = f"{r['ppl']:.2f} [{r['ppl_ci95'][0]:.2f}, {r['ppl_ci95'][1]:.2f}]"
        print(f"| {r['model']} | {r['params'] / 1e6:.1f} | {nll} | {rouge} | {loops} | {sampled} | {ppl} |")
    print("\nPaired differences a − b (95% bootstrap CI over prompts; ROUGE-L on seed-averaged scores):\n")
    print("| a − b | held-out NLL | " + " | ".join(f"{s} ROUGE-L" for s in sets) + " | "
          + " | ".join(f"{s} greedy loops (points)" for s in sets) + " |")
    print("|---" * (2 + 2 * len(sets)) + "|")
    for c in report["comparisons"]:
        print(f"| {c['a']} − {c['b']} | {_ci(c['nll'], 4, True)} | "
              + " | ".join(_ci(c[f"rouge_{s}"], 2, True) for s in sets) + " | "
              + " | ".join(_ci(c[f"loops_greedy_{s}"], 1, True) for s in sets) + " |")
    print("\nShare of the prune's gap to the teacher closed, % (teacher = 100, none = 0; 95% CI):\n")
    keys = list(next(iter(report["gap_closed"].values())))
    print("| method | " + " | ".join(keys) + " | WikiText-2 log-PPL |")
    print("|---" * (2 + len(keys)) + "|")
    for m, g in report["gap_closed"].items():
        print(f"| {m} | " + " | ".join(_ci(g[k], 0) for k in keys) + f" | {report['ppl_gap_closed'][m]:.0f} |")
    print("\nWall time per stage (s):", json.dumps(report["stage_seconds"]))


if __name__ == "__main__":
    main()
