"""Turn two-order verdicts into win/tie/loss, the paper's preference rate, and bootstrap CIs."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

#: verdict of the order "student shown as A" -> student outcome; the swapped order mirrors it
_AS_A = {"A": 1, "B": -1, "C": 0}
_AS_B = {"A": -1, "B": 1, "C": 0}


def combine(student_first: str | None, teacher_first: str | None) -> dict:
    """One question's outcome for the student from both presentation orders.

    Outcome +1 win / 0 tie / -1 loss; an order-dependent verdict counts as a tie (MT-bench's rule) and is
    flagged as a position flip; a missing verdict in either order makes the pair invalid."""
    if student_first is None or teacher_first is None:
        return {"outcome": None, "flip": False}
    a, b = _AS_A[student_first], _AS_B[teacher_first]
    return {"outcome": a if a == b else 0, "flip": a != b}


def calibrated_margin(student_first: dict[str, float], teacher_first: dict[str, float]) -> float:
    """Position-calibrated preference for the student from a log-prob judge's two orders.

    With the student as A the judge's margin log p(A) − log p(B) is s + b, with the teacher as A it is
    −s + b, where b is the judge's pull towards one position; (m1 − m2) / 2 cancels b and leaves s
    (balanced position calibration, Wang et al. 2023, "Large Language Models are not Fair Evaluators")."""
    m1 = student_first["A"] - student_first["B"]
    m2 = teacher_first["A"] - teacher_first["B"]
    return (m1 - m2) / 2


def _rates(x: np.ndarray) -> dict:
    n = len(x)
    win, tie, loss = ((x == 1).sum() / n, (x == 0).sum() / n, (x == -1).sum() / n) if n else (np.nan,) * 3
    return {
        "win": 100 * win,
        "tie": 100 * tie,
        "loss": 100 * loss,
        "preference": 100 * (win - loss),
        "adjusted_win": 100 * (win + tie / 2),
    }


def summarize(outcomes: list[int], flips: int, invalid: int, *, samples: int = 1000, seed: int = 0) -> dict:
    """Rates in % with 95% percentile-bootstrap CIs (questions resampled with replacement)."""
    x = np.asarray(outcomes, dtype=int)
    out = {"n": len(x), "invalid": invalid, "flip_rate": 100 * flips / len(x) if len(x) else None}
    rates = _rates(x)
    if len(x) and samples:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(x), size=(samples, len(x)))
        boot = x[idx]
        win, tie, loss = ((boot == v).mean(1) for v in (1, 0, -1))
        draws = {
            "win": win,
            "tie": tie,
            "loss": loss,
            "preference": win - loss,
            "adjusted_win": win + tie / 2,
        }
        for k, v in draws.items():
            lo, hi = np.percentile(100 * v, [2.5, 97.5])
            out[k] = {"value": float(rates[k]), "ci95": [float(lo), float(hi)]}
    else:
        out.update({k: {"value": float(v), "ci95": None} for k, v in rates.items()})
    return out


def pairwise_summary(pairs: list[dict], *, samples: int = 1000, seed: int = 0) -> dict:
    """Overall and per-category summaries of `combine` results carrying a `category` key each."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for p in pairs:
        groups[p.get("category") or "uncategorized"].append(p)

    def one(rows: list[dict]) -> dict:
        valid = [r for r in rows if r["outcome"] is not None]
        return summarize(
            [r["outcome"] for r in valid],
            sum(r["flip"] for r in valid),
            len(rows) - len(valid),
            samples=samples,
            seed=seed,
        )

    return {"overall": one(pairs), "categories": {c: one(rows) for c, rows in sorted(groups.items())}}
