"""`dadpo bench`'s summary: one paper-style table (and plot) comparing recovery methods on one recipe."""

from __future__ import annotations

from pathlib import Path

from dadpo.io import atomic_write_json, atomic_write_text

#: the zero-shot metric LLM-Pruner reports per task (acc_norm where length normalisation matters)
TASK_METRIC = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
               "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def method_row(name: str, block: dict, pairwise: dict | None) -> dict:
    """Headline numbers of one student from `run_evaluate`'s results."""
    row: dict = {"method": name, "params": block.get("params")}
    if pairwise:
        pref = [s["overall"]["preference"] for s in pairwise.values()]
        n = [s["overall"]["n"] for s in pairwise.values()]
        row["preference"] = sum(p["value"] * k for p, k in zip(pref, n, strict=True)) / max(sum(n), 1)
        row["preference_ci95"] = pref[0]["ci95"] if len(pref) == 1 else None
        row["flip_rate"] = next(iter(pairwise.values()))["overall"].get("flip_rate")
    rouge = [r["rougeL"] for r in block.get("rouge", {}).values()]
    row["rougeL"] = sum(rouge) / len(rouge) if rouge else None
    zs = block.get("zeroshot") or {}
    accs = [100 * zs[t][TASK_METRIC[t]] for t in zs if TASK_METRIC.get(t) in zs[t]]
    row["zeroshot_avg"] = sum(accs) / len(accs) if accs else None
    row["zeroshot_tasks"] = len(accs)
    ppl = [p for p in block.get("perplexity", []) if p["corpus"] == "wikitext2"]
    row["wikitext2_ppl"] = ppl[0]["ppl"] if ppl else None
    return row


def bench_rows(results: dict) -> list[dict]:
    rows = [method_row("teacher", results["teacher"], None)]
    rows += [method_row(n, b, results["pairwise"].get(n)) for n, b in results["students"].items()]
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| method | params (M) | preference vs teacher, % [95% CI] | ROUGE-L | zero-shot avg (%) | "
            "WikiText-2 PPL |\n|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        ci = r.get("preference_ci95")
        pref = "—" if r["method"] == "teacher" else (
            f"{_fmt(r.get('preference'))}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""))
        lines.append(f"| {r['method']} | {_fmt((r['params'] or 0) / 1e6)} | {pref} | {_fmt(r['rougeL'])} | "
                     f"{_fmt(r['zeroshot_avg'])} | {_fmt(r['wikitext2_ppl'], 2)} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Preference rate vs the teacher per method, with 95% CI whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["method"] != "teacher" and r.get("preference") is not None]
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 3.6))
    vals = [r["preference"] for r in rows]
    err = [[v - (r["preference_ci95"] or [v, v])[0] for v, r in zip(vals, rows, strict=True)],
           [(r["preference_ci95"] or [v, v])[1] - v for v, r in zip(vals, rows, strict=True)]]
    ax.bar([r["method"] for r in rows], vals, yerr=err, capsize=4, color="#4c72b0")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("preference rate vs teacher (%)\n(win − loss)")
    ax.set_title("Recovery methods against the teacher")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


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
