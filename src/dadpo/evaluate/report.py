"""report.md and PNG plots from a results dict (all files written atomically)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from dadpo.evaluate.stats import FLIP_LIMIT, LETTER_LIMIT, invalid_label
from dadpo.evaluate.zeroshot import Z95, pm95, zeroshot_summary
from dadpo.io import atomic_path, atomic_write_text


def _ci(m: dict) -> str:
    ci = m.get("ci95")
    return f"{m['value']:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{m['value']:.1f}"


def _fmt(x, nd: int = 1) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _verdict_check(validity: dict | None) -> str:
    """A set's judge validity in words: its `invalid_label`, "valid", or "–" where undecided or not recorded."""
    return invalid_label(validity) or ("valid" if (validity or {}).get("valid") else "–")


def render_markdown(results: dict) -> str:
    """A human report: judged preference vs the teacher, ROUGE-L, zero-shot accuracy, perplexity."""
    teacher = results["teacher"]
    lines = [f"# Evaluation against the teacher `{teacher['spec']}`", ""]
    lines += reference_section(results) + diagnostics_section(results)
    judge = results.get("judge")
    if results.get("pairwise"):
        lines += [
            f"## Pairwise judgement (judge: `{judge}`)",
            "",
            "Every answer pair is judged in both orders; a verdict that changes with the order is a tie. "
            "Preference rate = win − loss; adjusted win rate = win + ½ tie; brackets: 95% bootstrap CI. "
            "Flip rate = share of pairs whose verdict changed with the order. "
            f"A judge whose verdicts do not depend on the answers (flip rate ≥ {FLIP_LIMIT}%, or one verdict "
            f"letter for ≥ {LETTER_LIMIT}% of the prompts of one order) is marked invalid: its rates are not "
            "shown here (results.json keeps them, under `validity`).",
            "",
            "| student | set | n | win % | tie % | loss % | preference % | adjusted win % | flip % | invalid |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for student, sets in results["pairwise"].items():
            for s, summ in sets.items():
                o = summ["overall"]
                if flag := invalid_label(summ.get("validity")):  # no rates from a judge that does not judge
                    cells = f"– | – | – | {flag} | –"
                else:
                    cells = (f"{_ci(o['win'])} | {_ci(o['tie'])} | {_ci(o['loss'])} | {_ci(o['preference'])} "
                             f"| {_ci(o['adjusted_win'])}")
                lines.append(f"| {student} | {s} | {o['n']} | {cells} | {_fmt(o['flip_rate'])} | {o['invalid']} |")
        calibrated = [
            (st, s, summ["calibrated"], _verdict_check(summ.get("validity")))
            for st, sets in results["pairwise"].items()
            for s, summ in sets.items()
            if "calibrated" in summ
        ]
        if calibrated:
            lines += [
                "",
                "Local log-prob judge, position-calibrated: each pair scored by (m₁ − m₂)/2, the student's "
                "log p(A) − log p(B) margin as A minus its margin as B, which cancels the judge's pull "
                "towards one position; win = positive score. A different measurement from the verdicts above: "
                "it is shown even where they are invalid (a constant pull towards one position is what it "
                "removes), but the validity check does not cover it; where the verdicts failed it, read it as "
                "a weak signal from a judge that did not judge, not as that judge's result.",
                "",
                "| student | set | n | win % | loss % | preference % | mean margin | judge's verdicts |",
                "|---|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {st} | {s} | {c['n']} | {_fmt(c['win']['value'])} | {_fmt(c['loss']['value'])} | "
                f"{_ci(c['preference'])} | {_fmt(c['mean_margin'], 3)} | {check} |"
                for st, s, c, check in calibrated
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
                invalid = invalid_label(summ.get("validity")) is not None
                for cat, o in summ["categories"].items():
                    cells = ("– | – | – | judge invalid" if invalid else
                             f"{_fmt(o['win']['value'])} | {_fmt(o['tie']['value'])} | {_fmt(o['loss']['value'])} "
                             f"| {_ci(o['preference'])}")
                    lines.append(f"| {student} | {s} | {cat} | {o['n']} | {cells} | {_fmt(o['flip_rate'])} "
                                 f"| {o['invalid']} |")
        lines.append("")
    models = {"teacher": teacher, **results["students"]}
    zs = {name: zeroshot_summary(m.get("zeroshot", {})) for name, m in models.items()}
    tasks = sorted({t for s in zs.values() for t in s["tasks"]})
    if tasks:
        scored = [(t, r) for s in zs.values() for t, r in s["tasks"].items()]
        metric = {t: r["metric"] for t, r in scored}
        ns = {t: sorted({str(r["n"]) for u, r in scored if u == t and r["n"]}) for t in tasks}
        lines += [
            "## Zero-shot accuracy (lm-eval, %; LLM-Pruner's metric per task: "
            + ", ".join(f"{t} {metric[t]}" for t in tasks) + ")",
            "",
            "Each cell: value ± 95% interval (1.96 binomial standard errors, sqrt(p(1−p)/n) over the n items "
            "scored). Mean: unweighted over the tasks, ± 1.96·sqrt(Σ SE²)/T (tasks independent).",
            "",
            "| model | params (M) | "
            + " | ".join(f"{t} {metric[t]}" + (f" (n={'/'.join(ns[t])})" if ns[t] else "") for t in tasks)
            + " | mean |",
            "|---" * (len(tasks) + 3) + "|",
        ]
        for name, m in models.items():
            got = zs[name]["tasks"]
            cells = [pm95(got[t]["value"], got[t]["se"]) if t in got else "–" for t in tasks]
            lines.append(f"| {name} | {m['params'] / 1e6:.1f} | " + " | ".join(cells)
                         + f" | {pm95(zs[name]['mean'], zs[name]['se'])} |")
        lines.append("")
    ppl = [(name, r) for name, m in models.items() for r in m.get("perplexity", [])]
    if ppl:
        lines += [
            "## Perplexity (joined test text, non-overlapping windows)",
            "",
            "[95% CI]: bootstrap over windows (neighbouring windows of one text are not independent: a lower "
            "bound on the uncertainty).",
            "",
            "| model | corpus | seq_len | windows | PPL [95% CI] |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {n} | {r['corpus']} | {r['seq_len']} | {_windows(r)} | {_ppl(r)} |" for n, r in ppl]
        lines.append("")
    lines += [f"Plots: {', '.join(f'`{p}`' for p in results.get('plots', []))}", ""]
    return "\n".join(lines)


def _windows(r: dict) -> str:
    stride = r.get("window_stride", 1)
    return f"{r['windows']} (1 in {stride})" if stride > 1 else str(r["windows"])


def _ppl(r: dict) -> str:
    ci = r.get("ppl_ci95")
    return f"{r['ppl']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def mean_std_text(x: dict | None) -> str:
    """A score over seeds as "mean ± std" ("–" without one); report.md and the bench table."""
    return "–" if not x or x.get("mean") is None else f"{x['mean']:.1f} ± {x['std']:.1f}"


def delta_text(c: dict | None) -> str:
    """A paired difference as "+Δ [+lo, +hi]" ("–" without one); report.md and the bench table."""
    if not c or c.get("delta") is None:
        return "–"
    ci = c.get("ci95")
    return f"{c['delta']:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")


def reference_section(results: dict) -> list[str]:
    """Per reference set: each model's ROUGE-L (mean ± std over seeds, CI, per seed) and its paired
    difference from the baseline; then any extra comparisons."""
    models = {"teacher": results["teacher"], **results["students"]}
    sets = list(dict.fromkeys(s for m in models.values() for s in m.get("rouge", {})))
    if not sets:
        return []
    cfg, comps = results.get("config", {}), results.get("comparisons", [])
    g = cfg.get("generation", {})
    decoding = ("greedy" if not g.get("temperature") else
                f"sampled at temperature {g['temperature']}, top-p {g.get('top_p')}, seeds {cfg.get('seeds')}")
    base = next((c["b"] for c in comps), None)
    lines = ["## ROUGE-L against human references", "",
             f"Answers {decoding}, at most {g.get('max_new_tokens')} new tokens. ROUGE-L F1 × 100 (rouge_score, "
             "Porter stemming, best of the references) per prompt; mean over prompts for each seed, then "
             "mean ± std over seeds. CI: 95% bootstrap over prompts of the seed-averaged score. Δ: paired "
             f"difference from `{base}` on the same prompts, with its 95% paired bootstrap CI.", ""]
    for s in sets:
        rows = {n: m["rouge"][s] for n, m in models.items() if s in m.get("rouge", {})}
        first = next(iter(rows.values()))
        lines += [f"### {s} ({first['n']} prompts × {first['seeds']} seeds)", "",
                  f"| model | ROUGE-L (mean ± std over seeds) | 95% CI | per seed | Δ vs {base} [95% CI] |",
                  "|---|---|---|---|---|"]
        for n, r in rows.items():
            ci = r.get("ci95")
            per_seed = ", ".join(f"{v:.1f}" for v in r["per_seed"].values())
            delta = next((c for c in comps if c["set"] == s and c["a"] == n and c["b"] == base), None)
            lines.append(f"| {n} | {mean_std_text(r)} | {f'[{ci[0]:.1f}, {ci[1]:.1f}]' if ci else '–'} | {per_seed} "
                         f"| {'baseline' if n == base else delta_text(delta)} |")
        lines.append("")
    extra = [c for c in comps if c["b"] != base]
    if extra:
        lines += ["### Other comparisons", "", "| set | A − B | n | Δ ROUGE-L [95% paired CI] |", "|---|---|---|---|"]
        lines += [f"| {c['set']} | {c['a']} − {c['b']} | {c['n']} | {delta_text(c)} |" for c in extra]
        lines.append("")
    return lines


def diagnostics_section(results: dict) -> list[str]:
    """How each model's answers degenerate, per set (all seeds pooled)."""
    models = {"teacher": results["teacher"], **results["students"]}
    rows = [(n, s, d) for n, m in models.items() for s, d in m.get("diagnostics", {}).items() if d.get("answers")]
    if not rows:
        return []
    lines = ["## Answer diagnostics", "",
             "Over every answer (all seeds): mean length in tokens; share that stopped at the token cap; "
             "distinct-1/-2 = unique word uni-/bigrams over all of them (%); loops = share of answers in which "
             "one word 4-gram occurs 3 or more times.", "",
             "| model | set | answers | mean tokens | hit cap % | distinct-1 % | distinct-2 % | loops % |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {s} | {d['answers']} | {d['mean_tokens']:.0f} | {d['hit_cap']:.0f} | {_fmt(d['distinct_1'])} "
              f"| {_fmt(d['distinct_2'])} | {d['loops']:.0f} |" for n, s, d in rows]
    return lines + [""]


def _save(fig, path: Path) -> None:
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")


def _rouge_plot(results: dict, path: Path) -> bool:
    """ROUGE-L per model (one group of bars per reference set) with 95% CI whiskers; False when no set has
    references."""
    import matplotlib.pyplot as plt

    models = {"teacher": results["teacher"], **results["students"]}
    sets = list(dict.fromkeys(s for m in models.values() for s in m.get("rouge", {})))
    if not sets:
        return False
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(models) * len(sets) + 1.5), 4))
    width = 0.8 / len(models)
    for k, (name, m) in enumerate(models.items()):
        xs, ys, err = [], [], [[], []]
        for i, s in enumerate(sets):
            r = m.get("rouge", {}).get(s)
            if r and r.get("mean") is not None and r.get("ci95"):
                xs.append(i + k * width)
                ys.append(r["mean"])
                err[0].append(r["mean"] - r["ci95"][0])
                err[1].append(r["ci95"][1] - r["mean"])
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=name)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(sets))], sets)
    ax.set_ylabel("ROUGE-L F1 × 100")
    seeds = (results.get("config") or {}).get("seeds")
    ax.set_title(f"ROUGE-L against human references (mean over seeds {seeds}; 95% CI over prompts)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return True


def write_plots(results: dict, out_dir: str | os.PathLike) -> list[str]:
    """Win/tie/loss bars per student and set, zero-shot bars, params vs score; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import transforms

    out_dir = Path(out_dir)
    written = ["rouge.png"] if _rouge_plot(results, out_dir / "rouge.png") else []
    models = {"teacher": results["teacher"], **results["students"]}
    if results.get("pairwise"):
        # an invalid judge's row is one grey hatched bar with the reason on it: no win/loss bars, no preference
        rows = [
            (f"{st} · {s}", summ["overall"], invalid_label(summ.get("validity")))
            for st, sets in results["pairwise"].items()
            for s, summ in sets.items()
        ]
        fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.4))
        left = [0.0] * len(rows)
        for key, color in (("win", "#2e7d32"), ("tie", "#9e9e9e"), ("loss", "#c62828")):
            vals = [0.0 if flag else o[key]["value"] for _, o, flag in rows]
            ax.barh([r for r, _, _ in rows], vals, left=left, color=color, label=key)
            for i, (v, lft) in enumerate(zip(vals, left, strict=True)):
                if v >= 6:
                    ax.text(lft + v / 2, i, f"{v:.0f}", ha="center", va="center", color="white", fontsize=9)
            left = [a + b for a, b in zip(left, vals, strict=True)]
        invalid = [i for i, (_, _, flag) in enumerate(rows) if flag]
        if invalid:
            ax.barh(invalid, [100] * len(invalid), color="#eeeeee", edgecolor="#9e9e9e", hatch="//",
                    label="judge invalid")
        for i, (_, o, flag) in enumerate(rows):
            if flag:
                ax.text(50, i, textwrap.fill(flag, 60), ha="center", va="center", fontsize=8, color="#424242",
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5})
            ci = o["preference"].get("ci95")
            label = f"pref {o['preference']['value']:+.0f}" + (f"\n[{ci[0]:+.0f}, {ci[1]:+.0f}]" if ci else "")
            ax.text(101, i, "pref n/a" if flag else label, va="center", fontsize=8)
        ax.set_xlim(0, 122)
        ax.invert_yaxis()
        ax.set_xlabel("% of questions (student vs teacher, both orders)")
        ax.set_title(f"Judged against the teacher\n({results.get('judge')})", loc="left", fontsize=10)
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=4, fontsize=8, frameon=False)
        _save(fig, out_dir / "winrate.png")
        plt.close(fig)
        written.append("winrate.png")
    zs = {name: zeroshot_summary(m.get("zeroshot", {})) for name, m in models.items()}
    tasks = sorted({t for s in zs.values() for t in s["tasks"]})
    if tasks:
        metric = {t: s["tasks"][t]["metric"] for s in zs.values() for t in s["tasks"]}
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) + 3), 4))
        width = 0.8 / len(models)
        for k, (name, s) in enumerate(zs.items()):
            # a bar only with its interval: the tasks (and the mean) whose SE is known
            bars = [(i, s["tasks"][t]["value"], s["tasks"][t]["se"]) for i, t in enumerate(tasks) if t in s["tasks"]]
            bars = [b for b in [*bars, (len(tasks), s["mean"], s["se"])] if b[2] is not None]
            ax.bar([i + k * width for i, _, _ in bars], [v for _, v, _ in bars], width,
                   yerr=[Z95 * se for _, _, se in bars], capsize=3, label=name)
        ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(tasks) + 1)],
                      [f"{t}\n{metric[t]}" for t in tasks] + ["mean"], rotation=20)
        ax.set_ylabel("score % (LLM-Pruner's metric per task)")
        ax.set_ylim(0, 100)
        ax.set_title("Zero-shot accuracy (lm-eval); whiskers: 95% interval (1.96 binomial SE)")
        ax.legend(fontsize=8)
        _save(fig, out_dir / "zeroshot.png")
        plt.close(fig)
        written.append("zeroshot.png")
    score = _params_score(results)
    if score:
        label, points, reference = score
        fig, ax = plt.subplots(figsize=(6, 4))
        if reference is not None:
            ax.axhline(reference[1], color="gray", ls="--", lw=0.8, label=reference[0])
        for k, (name, params, value, (lo, hi)) in enumerate(points):
            # models of one size (the methods of one prune) sit side by side, 9 points apart, so that their
            # intervals stay apart; the legend names them
            same = sum(p == params for _, p, _, _ in points[:k])
            shift = transforms.offset_copy(ax.transData, fig=fig, x=9 * same, units="points")
            ax.errorbar(params / 1e6, value, yerr=[[value - lo], [hi - value]], fmt="o", capsize=4, label=name,
                        transform=shift)
            ax.update_datalim([(params / 1e6, lo), (params / 1e6, hi)])  # a shifted transform does not autoscale
        ax.autoscale_view()
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over an interval
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(label)
        ax.set_title("Size vs quality (whiskers: 95% interval)")
        ax.grid(alpha=0.3)
        _save(fig, out_dir / "params_vs_score.png")
        plt.close(fig)
        written.append("params_vs_score.png")
    return written


def _params_score(results: dict) -> tuple[str, list, tuple[str, float] | None] | None:
    """The score to plot against size, each point with its 95% interval (lo, hi): the mean zero-shot score
    (`zeroshot_summary`) if every model has one with its SE, else the adjusted win rate vs the teacher with its
    bootstrap CI (students without one, or whose judge is invalid there, are left out); the teacher is then
    the reference line at 50, a definition, not a measurement.
    Returns (axis label, [(name, params, value, (lo, hi))], reference)."""
    models = {"teacher": results["teacher"], **results["students"]}
    zs = {n: zeroshot_summary(m.get("zeroshot", {})) for n, m in models.items()}
    if all(s["se"] is not None for s in zs.values()):
        pts = [(n, models[n]["params"], s["mean"], (s["mean"] - Z95 * s["se"], s["mean"] + Z95 * s["se"]))
               for n, s in zs.items()]
        return "mean zero-shot score % (LLM-Pruner's metric per task)", pts, None
    if results.get("pairwise"):
        first = next(iter(next(iter(results["pairwise"].values()))))
        wins = {st: sets[first]["overall"]["adjusted_win"] for st, sets in results["pairwise"].items()
                if first in sets and not invalid_label(sets[first].get("validity"))}  # no point from a non-judge
        pts = [(st, results["students"][st]["params"], w["value"], tuple(w["ci95"]))
               for st, w in wins.items() if w.get("value") is not None and None not in (w.get("ci95") or [None])]
        teacher = f"teacher ({results['teacher']['params'] / 1e6:.1f}M) = 50 by definition"
        return (f"adjusted win rate vs teacher on {first} %", pts, (teacher, 50.0)) if pts else None
    return None


def write_report(results: dict, out_dir: str | os.PathLike) -> None:
    atomic_write_text(Path(out_dir) / "report.md", render_markdown(results))
