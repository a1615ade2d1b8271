"""Turn two-order verdicts into win/tie/loss, the paper's preference rate, bootstrap CIs, and whether the judge
read the answers at all (`judge_validity`)."""

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


#: a judge whose two presentation orders disagree on at least this share of pairs (%) does not judge by content
FLIP_LIMIT = 50
#: ... nor one that gives one verdict letter to at least this share of the prompts of one order (%)
LETTER_LIMIT = 90
_ORDERS = ("student_first", "teacher_first")
_MIRROR = {"A": "B", "B": "A"}


def judge_validity(verdict_pairs: list[tuple[str | None, str | None]], identical: list[bool] | None = None) -> dict:
    """Whether a judge's verdicts on one set depend on the answers' content, from its two-order verdicts.

    `verdict_pairs`: per question (verdict with the student shown as A, verdict with the teacher shown as A),
    each A/B/C or None (unparsable). `identical[k]`: the two answers of pair k are the same text.

    A judge is invalid when
      * its flip rate (pairs whose verdict changed with the order, among pairs with both verdicts) is at least
        `FLIP_LIMIT`%: a judge that reads the answers keeps its verdict when they swap places; a judge that
        ignores them flips whenever it does not say tie (always-[[A]] flips 100%, a coin 50%); or
      * one letter takes at least `LETTER_LIMIT`% of one order's verdicts (e.g. [[C]] for everything, which
        never flips). Exempt is an A/B letter whose mirror is the majority verdict of the other order: a
        student that really loses (or wins) nearly every question gets [[B]] student-first and [[A]]
        teacher-first from a good judge, which is a verdict that follows an answer, not a position; a judge
        blind to content has the same letter distribution in both orders and can never meet that exemption.
        Pairs of identical answers are left out of the letter shares (a tie there is the right verdict) but
        stay in the flip rate (a flip there is pure position bias).

    Returns {"valid": True/False, or None with no verdict pair to decide from; "reason": why invalid, e.g.
    "flip rate 100%; [[A]] for 100% of prompts with the student shown first"; "flip_rate": %; "letter_share":
    {order: {letter: %} or None}; "counts": the tallies decided from, which `pool_validity` adds up over sets}.
    """
    identical = identical if identical is not None else [False] * len(verdict_pairs)
    counts: dict = {"pairs": 0, "flips": 0, **{o: dict.fromkeys(_AS_A, 0) for o in _ORDERS}}
    for (first, second), same in zip(verdict_pairs, identical, strict=True):
        if first is not None and second is not None:
            counts["pairs"] += 1
            counts["flips"] += combine(first, second)["flip"]
        if not same:
            for order, v in zip(_ORDERS, (first, second), strict=True):
                if v is not None:
                    counts[order][v] += 1
    return _decide(counts)


def pool_validity(validities: list[dict]) -> dict | None:
    """One judge's validity over several sets (e.g. a bench row pooling its sets): the same rules on the summed
    counts; None when no set has a validity (results written before it existed)."""
    parts = [v["counts"] for v in validities if v]
    if not parts:
        return None
    counts = {"pairs": sum(c["pairs"] for c in parts), "flips": sum(c["flips"] for c in parts)}
    counts.update({o: {v: sum(c[o][v] for c in parts) for v in _AS_A} for o in _ORDERS})
    return _decide(counts)


def _decide(counts: dict) -> dict:
    """`judge_validity`'s rules on its counts (integer comparisons, so 50.0% and 90.0% are exactly the limits)."""
    pairs, flips = counts["pairs"], counts["flips"]
    reasons = []
    if pairs and 100 * flips >= FLIP_LIMIT * pairs:
        reasons.append(f"flip rate {100 * flips / pairs:.0f}%")
    shares, worst = {}, None
    for order, other in zip(_ORDERS, reversed(_ORDERS), strict=True):
        total, rest = sum(counts[order].values()), sum(counts[other].values())
        shares[order] = {v: 100 * c / total for v, c in counts[order].items()} if total else None
        for v, c in counts[order].items():
            follows_an_answer = v in _MIRROR and 2 * counts[other][_MIRROR[v]] > rest
            dominant = total and 100 * c >= LETTER_LIMIT * total and not follows_an_answer
            if dominant and (worst is None or c / total > worst[0]):  # the most lopsided order and letter
                worst = (c / total, v, order)
    if worst is not None:
        share, v, order = worst
        reasons.append(f"[[{v}]] for {100 * share:.0f}% of prompts with the {order.split('_')[0]} shown first")
    decided = pairs or any(sum(counts[o].values()) for o in _ORDERS)
    return {
        "valid": (not reasons) if decided else None,
        "reason": "; ".join(reasons) or None,
        "flip_rate": 100 * flips / pairs if pairs else None,
        "letter_share": shares,
        "counts": counts,
    }


def invalid_label(validity: dict | None) -> str | None:
    """The text that stands in for an invalid judge's numbers in tables and plots ("judge invalid (flip rate
    100%)"); None for a valid judge, an undecided one, or results without a validity."""
    if not validity or validity.get("valid") is not False:
        return None
    return f"judge invalid ({validity['reason']})"
