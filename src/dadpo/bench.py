"""`dadpo bench`'s summary: one paper-style table (and plot) comparing recovery methods on one recipe."""

from __future__ import annotations

import textwrap
from pathlib import Path

from dadpo.errors import DadpoError
from dadpo.evaluate.report import delta_text, mean_std_text
from dadpo.evaluate.stats import invalid_label, pool_validity
from dadpo.evaluate.zeroshot import Z95, zeroshot_summary
from dadpo.io import atomic_path, atomic_write_json, atomic_write_text, read_json_object


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def method_row(name: str, block: dict, pairwise: dict | None, comparisons: list[dict] = ()) -> dict:
    """Headline numbers of one student from `run_evaluate`'s results.

    `judge_validity` is the judge's validity pooled over the sets (`stats.pool_validity`) and `judge_invalid`
    its label when it fails: the table and plot then show the label instead of the preference, which stays
    in the row (bench.json), flagged; `flip_rate` is the pooled one when known. `rouge` holds per reference set
    the ROUGE-L mean ± std over seeds, `rouge_delta` the paired difference from the baseline (`comparisons`
    of `run_evaluate` where this method is `a`)."""
    row: dict = {"method": name, "params": block.get("params")}
    if pairwise:
        row["preference"], row["preference_ci95"] = _pooled([s["overall"] for s in pairwise.values()])
        row["flip_rate"] = next(iter(pairwise.values()))["overall"].get("flip_rate")
        validity = pool_validity([s.get("validity") for s in pairwise.values()])
        if validity is not None:
            row["judge_validity"] = {k: v for k, v in validity.items() if k != "counts"}
            row["judge_invalid"] = invalid_label(validity)
            row["flip_rate"] = validity["flip_rate"]
        if all("calibrated" in s for s in pairwise.values()):  # a local judge's position-calibrated reading
            row["preference_calibrated"], row["preference_calibrated_ci95"] = _pooled(
                [s["calibrated"] for s in pairwise.values()])
    row["rouge"] = {s: {"mean": r["mean"], "std": r["std"]} for s, r in block.get("rouge", {}).items()}
    base = next((c["b"] for c in comparisons), None)
    row["rouge_delta"] = {c["set"]: {"vs": c["b"], "delta": c["delta"], "ci95": c["ci95"]}
                          for c in comparisons if c["a"] == name and c["b"] == base}
    zs = zeroshot_summary(block.get("zeroshot") or {})  # the same mean and interval as report.md's
    row["zeroshot_avg"], row["zeroshot_tasks"] = zs["mean"], len(zs["tasks"])
    row["zeroshot_avg_ci95"] = None if zs["se"] is None else [zs["mean"] - Z95 * zs["se"], zs["mean"] + Z95 * zs["se"]]
    ppl = [p for p in block.get("perplexity", []) if p["corpus"] == "wikitext2"]
    row["wikitext2_ppl"] = ppl[0]["ppl"] if ppl else None
    row["wikitext2_ppl_ci95"] = ppl[0].get("ppl_ci95") if ppl else None
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
    """A preference cell: the judge-invalid label instead of the verdicts' rate; a dagger on the calibrated
    log-prob reading of such a judge (see `markdown_table`)."""
    if key == "preference" and r.get("judge_invalid"):
        return r["judge_invalid"]
    if r["method"] == "teacher" or r.get(key) is None:
        return "—"
    ci = r.get(f"{key}_ci95")
    return _fmt(r[key]) + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "") + ("†" if r.get("judge_invalid") else "")


def _ppl(r: dict) -> str:
    ci = r.get("wikitext2_ppl_ci95")
    return _fmt(r["wikitext2_ppl"], 2) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _zeroshot(r: dict) -> str:
    """The zero-shot mean ± the half-width of its 95% interval (as in report.md)."""
    ci = r.get("zeroshot_avg_ci95")
    return _fmt(r["zeroshot_avg"]) + (f" ± {(ci[1] - ci[0]) / 2:.1f}" if ci else "")


def bench_rows(results: dict) -> list[dict]:
    comparisons = results.get("comparisons", [])
    rows = [method_row("teacher", results["teacher"], None, comparisons)]
    rows += [method_row(n, b, results["pairwise"].get(n), comparisons) for n, b in results["students"].items()]
    return rows


def _rouge_cells(r: dict, sets: list[str], base: str | None) -> str:
    """Per reference set: ROUGE-L mean ± std over seeds, and the paired difference from the baseline."""
    cells = []
    for s in sets:
        cells.append(mean_std_text(r["rouge"].get(s)))
        if base is not None:
            cells.append("baseline" if r["method"] == base else delta_text(r["rouge_delta"].get(s)))
    return "".join(f" {c} |" for c in cells)


def markdown_table(rows: list[dict]) -> str:
    """The bench table, headline first: ROUGE-L against human references per set (mean ± std over sampling
    seeds) with the paired 95% CI of the difference from the baseline (the unrecovered student, `none`), then
    the judge, zero-shot and perplexity. A judge that failed the validity check shows "judge invalid
    (reason)" for its preference, and a footnote says what its calibrated reading (kept, with a dagger) is
    and is not."""
    calibrated = any(r.get("preference_calibrated") is not None for r in rows)
    sets = list(dict.fromkeys(s for r in rows for s in r.get("rouge", {})))
    base = next((d["vs"] for r in rows for d in r.get("rouge_delta", {}).values()), None)
    delta = f" Δ vs {base} [95% CI] |" if base else ""
    head = ("| method | params (M) |" + "".join(f" ROUGE-L {s} ± std |{delta}" for s in sets)
            + " preference vs teacher, % [95% CI] |" + (" calibrated preference, % [95% CI] |" if calibrated else "")
            + " zero-shot avg (%) ± 95% | WikiText-2 PPL [95% CI] |\n|---|---|"
            + ("---|---|" if base else "---|") * len(sets) + "---|"
            + ("---|" if calibrated else "") + "---|---|\n")
    lines = []
    for r in rows:
        lines.append(f"| {r['method']} | {_fmt((r['params'] or 0) / 1e6)} |" + _rouge_cells(r, sets, base)
                     + f" {_pref(r, 'preference')} |"
                     + (f" {_pref(r, 'preference_calibrated')} |" if calibrated else "")
                     + f" {_zeroshot(r)} | {_ppl(r)} |")
    note = ""
    if calibrated and any(r.get("judge_invalid") and r.get("preference_calibrated") is not None for r in rows):
        note = ("\n† position-calibrated log-prob reading of a judge whose verdicts failed the validity check: a "
                "different measurement (it cancels a constant pull towards one position) that the check does not "
                "cover; a weak signal, not that judge's result.\n")
    return head + "\n".join(lines) + "\n" + note


def plot(rows: list[dict], path: Path) -> None:
    """Preference rate vs the teacher per method, with 95% CI whiskers. A method whose judge failed the
    validity check gets the reason in place of its verdict bar; its calibrated bar stays (see `markdown_table`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["method"] != "teacher" and r.get("preference") is not None]
    invalid = [r.get("judge_invalid") for r in rows]  # such a row gets its reason instead of a verdict bar
    readings = [("preference", "judge verdicts (both orders)", "#4c72b0")]
    if any(r.get("preference_calibrated") is not None for r in rows):
        readings.append(("preference_calibrated", "position-calibrated log-probs"
                         + (" (not covered by the validity check)" if any(invalid) else ""), "#dd8452"))
    fig, ax = plt.subplots(figsize=((2.2 if any(invalid) else 1.6) * len(rows) + 2, 3.8 + 0.8 * any(invalid)))
    width = 0.8 / len(readings)
    for k, (key, label, color) in enumerate(readings):
        vals = [r.get(key) or 0.0 for r in rows]
        cis = [r.get(f"{key}_ci95") or [v, v] for v, r in zip(vals, rows, strict=True)]
        err = [[v - c[0] for v, c in zip(vals, cis, strict=True)], [c[1] - v for v, c in zip(vals, cis, strict=True)]]
        xs = [i + (k - (len(readings) - 1) / 2) * width for i in range(len(rows))]
        if key == "preference":  # an invalid judge's slot: a grey hatched band, no bar; the reason is on the axis
            for n, x in enumerate(x for x, flag in zip(xs, invalid, strict=True) if flag):
                ax.axvspan(x - width / 2, x + width / 2, facecolor="#eeeeee", edgecolor="#9e9e9e", hatch="//",
                           label=None if n else "judge invalid: no verdict bar")
            keep = [i for i, flag in enumerate(invalid) if not flag]
            xs, vals, err = [xs[i] for i in keep], [vals[i] for i in keep], [[e[i] for i in keep] for e in err]
        ax.bar(xs, vals, width, yerr=err, capsize=4, color=color, label=label)
    ax.set_xticks(range(len(rows)), [r["method"] + (f"\n{textwrap.fill(flag, 30)}" if flag else "")
                                     for r, flag in zip(rows, invalid, strict=True)], fontsize=9)
    if len(readings) > 1 or any(invalid):
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
