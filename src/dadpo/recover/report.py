"""Plots of a recover run: training_curves.png (every run) and teacher_term.png (preference runs).

training_curves.png follows each training stage's loss, and for dDPO/daDPO the margins and accuracies,
per logged step, from the Trainer's log history. teacher_term.png shows how daDPO's teacher term acts
on the pairs. Each pair's gradient is scaled by w = σ(−u), u = β1·Δ_ref + β2·Δ_te (`losses.teacher_term_stats`). The
left panel shows u over the training pairs as training starts (policy = π_ref, so u = β2·Δ_te) and over
the held-out pairs under the trained policy, with the line past which w > 0.99 (saturated: the teacher
then only rescales dDPO's direction). The right panel follows the mean w and the saturated share of each
training step's pairs, from the Trainer's log history.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from dadpo.io import atomic_path, atomic_write_json
from dadpo.recover.losses import SATURATED

if TYPE_CHECKING:
    from dadpo.recover.config import RecoverConfig

#: u below this has w = σ(−u) > SATURATED
SATURATION_U = -math.log(SATURATED / (1 - SATURATED))


def plot_teacher_term(path: Path, u: dict[str, list[float]], log_history: list[dict], title: str) -> None:
    """Write the two panels to `path`. `u`: per-pair u by set ("start" training pairs, "end" held-out
    pairs); `log_history`: the Trainer's, whose training rows carry "weight" and "saturated"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = {"start": "training pairs, start (π = π_ref)", "end": "held-out pairs, end"}
    values = [v for vals in u.values() for v in vals]
    lo, hi = min([*values, SATURATION_U]) - 1, max([*values, 0.0]) + 1
    bins = [lo + (hi - lo) * i / 40 for i in range(41)]
    for key, vals in u.items():
        if vals:
            share = sum(v < SATURATION_U for v in vals) / len(vals)
            left.hist(vals, bins=bins, alpha=0.55, label=f"{labels.get(key, key)}: {share:.0%} saturated")
    left.axvline(SATURATION_U, color="black", ls="--", lw=0.9)
    left.text(SATURATION_U, left.get_ylim()[1] * 0.95, f" w > {SATURATED}", fontsize=8, va="top")
    left.set_xlabel("u = β1·Δ_ref + β2·Δ_te (nats)")
    left.set_ylabel("pairs")
    left.legend(fontsize=8)
    steps = [row for row in log_history if "weight" in row]
    if steps:
        xs = [row["step"] for row in steps]
        right.plot(xs, [row["weight"] for row in steps], label="mean weight σ(−u)")
        right.plot(xs, [row["saturated"] for row in steps], label=f"share with σ(−u) > {SATURATED}")
        right.legend(fontsize=8)
    right.set_ylim(-0.03, 1.03)
    right.set_xlabel("optimizer step")
    right.set_title("per training step", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


#: panels of the training curves: (title, [(log key, label)], keys drawn on a second y axis)
_PANELS = [("loss", [("loss", "loss")], ()),
           ("margins (nats)", [("margin_ref", "Δ_ref"), ("margin_te", "Δ_te (right axis)")], ("margin_te",)),
           ("pair accuracy", [("reward_acc", "reward acc (Δ_ref > 0)"),
                              ("objective_acc", "objective acc (u > 0)")], ()),
           ("token KD", [("kd", "KD divergence")], ())]


def _running_mean(ys: tuple[float, ...], window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start): the trend through noisy steps."""
    return [sum(ys[max(0, i + 1 - window): i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(ys))]


def plot_training_curves(path: Path, histories: dict[str, list[dict]], title: str) -> None:
    """Write per-step curves of every stage in `histories` (stage name → the Trainer's log history) to
    `path`: loss, then the margins, pair accuracies and KD term where the stage logged them; each logged
    value faint, its running mean over a tenth of the steps solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {stage: [r for r in h if "loss" in r and "step" in r] for stage, h in histories.items()}
    panels = [p for p in _PANELS if any(k in r for h in rows.values() for r in h for k, _ in p[1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.5), squeeze=False)
    for ax, (name, keys, right) in zip(axes[0], panels, strict=True):
        twin = ax.twinx() if right else None
        colors = (f"C{k}" for k in range(10 ** 3))  # one cycle over both y axes
        for stage, h in rows.items():
            for key, label in keys:
                pts = [(r["step"], r[key]) for r in h if key in r]
                if pts:
                    target = twin if key in right else ax
                    xs, ys = zip(*pts, strict=True)
                    color, ls = next(colors), "--" if key in right else "-"
                    target.plot(xs, ys, color=color, alpha=0.3, lw=0.8, ls=ls)
                    target.plot(xs, _running_mean(ys, max(1, len(ys) // 10)), color=color, ls=ls,
                                label=f"{stage}: {label}")
        handles = [h for a in (ax, twin) if a for h in a.get_legend_handles_labels()[0]]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_teacher_term(out: Path, u: dict[str, list[float]], cfg: RecoverConfig) -> None:
    """teacher_term.json (per-pair u at the start and end) and its plot, teacher_term.png."""
    beta2 = cfg.beta2 if cfg.method == "dadpo" else 0.0
    atomic_write_json(out / "teacher_term.json", {"beta1": cfg.beta1, "beta2": beta2, "margin": cfg.margin, "u": u})
    history = out / "train" / "log_history.json"
    title = f"{cfg.method}: β1 = {cfg.beta1:g}, β2 = {beta2:g}, margin = {cfg.margin}"
    plot_teacher_term(out / "teacher_term.png", u, json.loads(history.read_text()) if history.is_file() else [],
                      title)


def write_training_curves(out: Path, cfg: RecoverConfig) -> None:
    """training_curves.png from the stages' log histories (dSFT, then the method's own stage)."""
    histories = {stage: json.loads(p.read_text()) for stage, p in
                 (("dsft", out / "dsft" / "log_history.json"), (cfg.method, out / "train" / "log_history.json"))
                 if p.is_file()}
    plot_training_curves(out / "training_curves.png", histories, f"recover {cfg.method}: per-step training logs")
