"""teacher_term.png of a preference run: how daDPO's teacher term acts on its pairs.

Each pair's gradient is scaled by w = σ(−u), u = β1·Δ_ref + β2·Δ_te (`losses.teacher_term_stats`). The
left panel shows u over the training pairs as training starts (policy = π_ref, so u = β2·Δ_te) and over
the held-out pairs under the trained policy, with the line past which w > 0.99 (saturated: the teacher
then only rescales dDPO's direction). The right panel follows the mean w and the saturated share of each
training step's pairs, from the Trainer's log history.
"""

from __future__ import annotations

import math
from pathlib import Path

from dadpo.io import atomic_path
from dadpo.recover.losses import SATURATED

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
