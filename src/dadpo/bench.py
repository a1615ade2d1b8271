"""`dadpo bench`'s summary: one paper-style table (and plot) comparing recovery methods on one recipe."""

from __future__ import annotations

from pathlib import Path

from dadpo.errors import DadpoError
from dadpo.io import atomic_path, atomic_write_json, atomic_write_text, read_json_object

#: the zero-shot metric LLM-Pruner reports per task (acc_norm where length normalisation matters)
TASK_METRIC = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
               "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def method_row(name: str, block: dict, pairwise: dict | None) -> dict:
    """Headline numbers of one student from `run_evaluate`'s results."""
    row: dict = {"method": name, "params": block.get("params")}
    if pairwise:
        row["preference"], row["preference_ci95"] = _pooled([s["overall"] for s in pairwise.values()])
        row["flip_rate"] = next(iter(pairwise.values()))["overall"].get("flip_rate")
        if all("calibrated" in s for s in pairwise.values()):  # a local judge's position-calibrated reading
            row["preference_calibrated"], row["preference_calibrated_ci95"] = _pooled(
                [s["calibrated"] for s in pairwise.values()])
    rouge = [r["rougeL"] for r in block.get("rouge", {}).values()]
    row["rougeL"] = sum(rouge) / len(rouge) if rouge else None
    zs = block.get("zeroshot") or {}
    accs = [100 * zs[t][TASK_METRIC[t]] for t in zs if TASK_METRIC.get(t) in zs[t]]
    row["zeroshot_avg"] = sum(accs) / len(accs) if accs else None
    row["zeroshot_tasks"] = len(accs)
    ppl = [p for p in block.get("perplexity", []) if p["corpus"] == "wikitext2"]
    row["wikitext2_ppl"] = ppl[0]["ppl"] if ppl else None
    return row


def _pooled(summaries: list[dict]) -> tuple[float | None, list[float] | None]:
    """Preference rate pooled over evaluation sets (weighted by n); the CI only when there is one set.
    Sets without a valid verdict (n = 0, rate null) carry no weight; with none at all the rate is None."""
    summaries = [s for s in summaries if s["n"]]
    if not summaries:
        return None, None
    value = sum(s["preference"]["value"] * s["n"] for s in summaries) / sum(s["n"] for s in summaries)
    return value, summaries[0]["preference"]["ci95"] if len(summaries) == 1 else None


def _pref(r: dict, key: str) -> str:
    if r["method"] == "teacher" or r.get(key) is None:
        return "—"
    ci = r.get(f"{key}_ci95")
    return _fmt(r[key]) + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def bench_rows(results: dict) -> list[dict]:
    rows = [method_row("teacher", results["teacher"], None)]
    rows += [method_row(n, b, results["pairwise"].get(n)) for n, b in results["students"].items()]
    return rows


def markdown_table(rows: list[dict]) -> str:
    calibrated = any(r.get("preference_calibrated") is not None for r in rows)
    head = ("| method | params (M) | preference vs teacher, % [95% CI] |"
            + (" calibrated preference, % [95% CI] |" if calibrated else "")
            + " ROUGE-L | zero-shot avg (%) | WikiText-2 PPL |\n|---|---|---|" + ("---|" if calibrated else "")
            + "---|---|---|\n")
    lines = []
    for r in rows:
        lines.append(f"| {r['method']} | {_fmt((r['params'] or 0) / 1e6)} | {_pref(r, 'preference')} |"
                     + (f" {_pref(r, 'preference_calibrated')} |" if calibrated else "")
                     + f" {_fmt(r['rougeL'])} | {_fmt(r['zeroshot_avg'])} | {_fmt(r['wikitext2_ppl'], 2)} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Preference rate vs the teacher per method, with 95% CI whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["method"] != "teacher" and r.get("preference") is not None]
    readings = [("preference", "judge verdicts (both orders)", "#4c72b0")]
    if any(r.get("preference_calibrated") is not None for r in rows):
        readings.append(("preference_calibrated", "position-calibrated log-probs", "#dd8452"))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.8))
    width = 0.8 / len(readings)
    for k, (key, label, color) in enumerate(readings):
        vals = [r.get(key) or 0.0 for r in rows]
        cis = [r.get(f"{key}_ci95") or [v, v] for v, r in zip(vals, rows, strict=True)]
        err = [[v - c[0] for v, c in zip(vals, cis, strict=True)], [c[1] - v for v, c in zip(vals, cis, strict=True)]]
        xs = [i + (k - (len(readings) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, vals, width, yerr=err, capsize=4, color=color, label=label)
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows])
    if len(readings) > 1:
        ax.legend(fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("preference rate vs teacher (%)\n(win − loss)")
    ax.set_title("Recovery methods against the teacher")
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


BENCH_FILES = ("table.md", "bench.json", "preference.png")


def check_bench_dir(out_dir: Path) -> None:
    """Refuse a bench folder whose table, JSON or plot `write_bench` would replace unless its bench.json is
    one dadpo wrote (the command and the rows): dadpo replaces only what it can prove it made."""
    there = [name for name in BENCH_FILES if (out_dir / name).exists() or (out_dir / name).is_symlink()]
    if there and not {"command", "rows"} <= (read_json_object(out_dir / "bench.json") or {}).keys():
        raise DadpoError(f"{out_dir / there[0]} exists but dadpo did not write it (no bench.json of a dadpo bench "
                         "beside it); move it or choose another output_dir")


def write_bench(out_dir: Path, results: dict, command: str) -> str:
    """Write table.md, bench.json and preference.png into `out_dir`; return the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = bench_rows(results)
    table = markdown_table(rows)
    atomic_write_text(out_dir / "table.md", f"Command: `{command}`\n\n{table}")
    atomic_write_json(out_dir / "bench.json", {"command": command, "rows": rows})
    if any(r.get("preference") is not None for r in rows):
        plot(rows, out_dir / "preference.png")
    return table
