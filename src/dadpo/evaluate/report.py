"""report.md and PNG plots from a results dict (all files written atomically)."""

from __future__ import annotations

import os
from pathlib import Path

from dadpo.io import atomic_path, atomic_write_text


def _ci(m: dict) -> str:
    ci = m.get("ci95")
    return f"{m['value']:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{m['value']:.1f}"


def _fmt(x, nd: int = 1) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _pct(x: float | None) -> str:
    """A 0–1 accuracy as a percentage; "–" where the task has no such metric (boolq, winogrande: no acc_norm)."""
    return _fmt(None if x is None else 100 * x)


def render_markdown(results: dict) -> str:
    """A human report: judged preference vs the teacher, ROUGE-L, zero-shot accuracy, perplexity."""
    teacher = results["teacher"]
    lines = [f"# Evaluation against the teacher `{teacher['spec']}`", ""]
    judge = results.get("judge")
    if results.get("pairwise"):
        lines += [
            f"## Pairwise judgement (judge: `{judge}`)",
            "",
            "Every answer pair is judged in both orders; a verdict that changes with the order is a tie. "
            "Preference rate = win − loss; adjusted win rate = win + ½ tie; brackets: 95% bootstrap CI. "
            "Flip rate = share of pairs whose verdict changed with the order.",
            "",
            "| student | set | n | win % | tie % | loss % | preference % | adjusted win % | flip % | invalid |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for student, sets in results["pairwise"].items():
            for s, summ in sets.items():
                o = summ["overall"]
                lines.append(
                    f"| {student} | {s} | {o['n']} | {_ci(o['win'])} | {_ci(o['tie'])} | {_ci(o['loss'])} "
                    f"| {_ci(o['preference'])} | {_ci(o['adjusted_win'])} | {_fmt(o['flip_rate'])} "
                    f"| {o['invalid']} |"
                )
        calibrated = [
            (st, s, summ["calibrated"])
            for st, sets in results["pairwise"].items()
            for s, summ in sets.items()
            if "calibrated" in summ
        ]
        if calibrated:
            lines += [
                "",
                "Local log-prob judge, position-calibrated: each pair scored by (m₁ − m₂)/2, the student's "
                "log p(A) − log p(B) margin as A minus its margin as B, which cancels the judge's pull "
                "towards one position; win = positive score.",
                "",
                "| student | set | n | win % | loss % | preference % | mean margin |",
                "|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {st} | {s} | {c['n']} | {_fmt(c['win']['value'])} | {_fmt(c['loss']['value'])} | "
                f"{_ci(c['preference'])} | {_fmt(c['mean_margin'], 3)} |"
                for st, s, c in calibrated
            ]
        lines += [
            "",
            "### Per category",
            "",
            "| student | set | category | n | win % | tie % | loss % | preference % | flip % | invalid |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for student, sets in results["pairwise"].items():
            for s, summ in sets.items():
                for cat, o in summ["categories"].items():
                    lines.append(
                        f"| {student} | {s} | {cat} | {o['n']} | {_fmt(o['win']['value'])} | "
                        f"{_fmt(o['tie']['value'])} | {_fmt(o['loss']['value'])} | {_ci(o['preference'])} "
                        f"| {_fmt(o['flip_rate'])} | {o['invalid']} |"
                    )
        lines.append("")
    models = {"teacher": teacher, **results["students"]}
    rouge_sets = sorted({s for m in models.values() for s in m.get("rouge", {})})
    if rouge_sets:
        lines += [
            "## ROUGE-L F1 against reference answers (%)",
            "",
            "| model | " + " | ".join(rouge_sets) + " |",
            "|---" * (len(rouge_sets) + 1) + "|",
        ]
        for name, m in models.items():
            cells = [_fmt((m.get("rouge", {}).get(s) or {}).get("rougeL")) for s in rouge_sets]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    tasks = sorted({t for m in models.values() for t in m.get("zeroshot", {})})
    if tasks:
        lines += [
            "## Zero-shot accuracy (lm-eval; acc / acc_norm, %)",
            "",
            "| model | params (M) | " + " | ".join(tasks) + " | mean acc |",
            "|---" * (len(tasks) + 3) + "|",
        ]
        for name, m in models.items():
            zs = m.get("zeroshot", {})
            cells = [
                f"{_pct(zs[t].get('acc'))} / {_pct(zs[t].get('acc_norm'))}" if t in zs else "–" for t in tasks
            ]
            lines.append(f"| {name} | {m['params'] / 1e6:.1f} | " + " | ".join(cells) + f" | {_fmt(mean_acc(m))} |")
        lines.append("")
    ppl = [(name, r) for name, m in models.items() for r in m.get("perplexity", [])]
    if ppl:
        lines += [
            "## Perplexity (joined test text, non-overlapping windows)",
            "",
            "| model | corpus | seq_len | windows | PPL |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {n} | {r['corpus']} | {r['seq_len']} | {r['windows']} | {r['ppl']:.2f} |" for n, r in ppl]
        lines.append("")
    lines += [f"Plots: {', '.join(f'`{p}`' for p in results.get('plots', []))}", ""]
    return "\n".join(lines)


def mean_acc(m: dict) -> float | None:
    zs = m.get("zeroshot", {})
    return 100 * sum(r["acc"] for r in zs.values()) / len(zs) if zs else None


def _save(fig, path: Path) -> None:
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")


def write_plots(results: dict, out_dir: str | os.PathLike) -> list[str]:
    """Win/tie/loss bars per student and set, zero-shot bars, params vs score; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    models = {"teacher": results["teacher"], **results["students"]}
    if results.get("pairwise"):
        rows = [
            (f"{st} · {s}", summ["overall"]) for st, sets in results["pairwise"].items() for s, summ in sets.items()
        ]
        fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.4))
        left = [0.0] * len(rows)
        for key, color in (("win", "#2e7d32"), ("tie", "#9e9e9e"), ("loss", "#c62828")):
            vals = [o[key]["value"] for _, o in rows]
            ax.barh([r for r, _ in rows], vals, left=left, color=color, label=key)
            for i, (v, lft) in enumerate(zip(vals, left, strict=True)):
                if v >= 6:
                    ax.text(lft + v / 2, i, f"{v:.0f}", ha="center", va="center", color="white", fontsize=9)
            left = [a + b for a, b in zip(left, vals, strict=True)]
        for i, (_, o) in enumerate(rows):
            ax.text(101, i, f"pref {o['preference']['value']:+.0f}", va="center", fontsize=9)
        ax.set_xlim(0, 115)
        ax.invert_yaxis()
        ax.set_xlabel("% of questions (student vs teacher, both orders)")
        ax.set_title(f"Judged against the teacher\n({results.get('judge')})", loc="left", fontsize=10)
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, fontsize=8, frameon=False)
        _save(fig, out_dir / "winrate.png")
        plt.close(fig)
        written.append("winrate.png")
    tasks = sorted({t for m in models.values() for t in m.get("zeroshot", {})})
    if tasks:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) + 2), 4))
        width = 0.8 / len(models)
        for k, (name, m) in enumerate(models.items()):
            vals = [100 * m["zeroshot"][t]["acc"] if t in m.get("zeroshot", {}) else 0 for t in tasks]
            ax.bar([i + k * width for i in range(len(tasks))], vals, width, label=name)
        ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(tasks))], tasks, rotation=20)
        ax.set_ylabel("accuracy %")
        ax.set_ylim(0, 100)
        ax.set_title("Zero-shot accuracy (lm-eval)")
        ax.legend(fontsize=8)
        _save(fig, out_dir / "zeroshot.png")
        plt.close(fig)
        written.append("zeroshot.png")
    score = _params_score(results)
    if score:
        label, points = score
        fig, ax = plt.subplots(figsize=(6, 4))
        for k, (name, params, value) in enumerate(points):
            ax.scatter(params / 1e6, value, s=40)
            # staggered labels stay readable when models coincide (e.g. a student equal to the teacher)
            ax.annotate(name, (params / 1e6, value), textcoords="offset points", xytext=(6, 6 - 11 * k), fontsize=9)
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(label)
        ax.set_title("Size vs quality")
        ax.grid(alpha=0.3)
        _save(fig, out_dir / "params_vs_score.png")
        plt.close(fig)
        written.append("params_vs_score.png")
    return written


def _params_score(results: dict) -> tuple[str, list[tuple[str, int, float]]] | None:
    """The score to plot against size: mean zero-shot acc if measured, else adjusted win rate (teacher 50)."""
    models = {"teacher": results["teacher"], **results["students"]}
    if all(mean_acc(m) is not None for m in models.values()):
        return "mean zero-shot acc %", [(n, m["params"], mean_acc(m)) for n, m in models.items()]
    if results.get("pairwise"):
        first = next(iter(next(iter(results["pairwise"].values()))))
        pts = [("teacher", results["teacher"]["params"], 50.0)]
        pts += [
            (st, results["students"][st]["params"], sets[first]["overall"]["adjusted_win"]["value"])
            for st, sets in results["pairwise"].items()
        ]
        return f"adjusted win rate vs teacher on {first} %", pts
    return None


def write_report(results: dict, out_dir: str | os.PathLike) -> None:
    atomic_write_text(Path(out_dir) / "report.md", render_markdown(results))
