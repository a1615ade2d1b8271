"""Reference-based evaluation, the protocol of the distillation papers at small scale (MiniLLM, DistiLLM):
ROUGE-L of sampled answers against human-written references, averaged over sampling seeds; paired
bootstrap CIs of the difference between two models on the same prompts; and cheap diagnostics of how
answers degenerate (pruned models fail by looping and by running to the token cap)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import cache
from statistics import fmean, stdev

import numpy as np

#: an answer "loops" when one word 4-gram occurs this often in it (natural text almost never repeats a
#: 4-gram three times in a few hundred words; a degenerate answer repeats one until the token cap)
LOOP_NGRAM, LOOP_REPEATS = 4, 3


@cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(answer: str, references: str | Sequence[str] | None) -> float | None:
    """ROUGE-L F1 × 100 of `answer` against its best-matching reference (rouge_score's tokenizer with
    Porter stemming, as in MiniLLM/DistiLLM); None when there is no non-empty reference."""
    refs = [references] if isinstance(references, str) else list(references or [])
    refs = [r for r in refs if r and r.strip()]
    if not refs:
        return None
    return 100 * max(_scorer().score(r, answer)["rougeL"].fmeasure for r in refs)


def prompt_scores(rows: Sequence[dict]) -> dict[str, float]:
    """Prompt id -> ROUGE-L of the first answer against the row's reference(s), for rows that have one
    (a reference answers the first user turn; later turns of a multi-turn prompt have none)."""
    out = {}
    for r in rows:
        answer = (r.get("responses") or [r.get("response", "")])[0]
        score = rouge_l(answer, r.get("reference"))
        if score is not None:
            out[r["id"]] = score
    return out


def _bootstrap_mean_ci(x: np.ndarray, samples: int, seed: int) -> list[float] | None:
    """95% percentile-bootstrap CI of the mean of `x` (prompts resampled with replacement)."""
    if not samples or len(x) < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, len(x), size=(samples, len(x)))
    lo, hi = np.percentile(x[idx].mean(1), [2.5, 97.5])
    return [float(lo), float(hi)]


def seed_average(per_seed: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Per-prompt score averaged over the seeds (prompts scored under every seed)."""
    ids = set.intersection(*(set(s) for s in per_seed.values())) if per_seed else set()
    return {i: fmean(s[i] for s in per_seed.values()) for i in sorted(ids)}


def seed_summary(per_seed: Mapping[int, Mapping[str, float]], *, samples: int = 1000, seed: int = 0) -> dict:
    """A model's score on one set: the mean over prompts for each seed, then mean ± std (sample std) over
    seeds; `ci95` is the bootstrap CI over prompts of the seed-averaged mean."""
    means = {k: fmean(v.values()) for k, v in per_seed.items() if v}
    if not means:
        return {"mean": None, "std": None, "per_seed": {}, "ci95": None, "n": 0, "seeds": 0}
    averaged = np.array(list(seed_average(per_seed).values()))
    return {"mean": fmean(means.values()), "std": stdev(means.values()) if len(means) > 1 else 0.0,
            "per_seed": {str(k): v for k, v in means.items()}, "ci95": _bootstrap_mean_ci(averaged, samples, seed),
            "n": len(averaged), "seeds": len(means)}


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], *, samples: int = 1000, seed: int = 0
                      ) -> dict:
    """Mean of (a − b) over the prompts both scored, with its 95% paired bootstrap CI: prompts are resampled
    together for both models, so the prompt-to-prompt spread that both share cancels."""
    ids = sorted(set(a) & set(b))
    d = np.array([a[i] - b[i] for i in ids])
    return {"delta": float(d.mean()) if len(d) else None, "ci95": _bootstrap_mean_ci(d, samples, seed), "n": len(d)}


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[k:k + n]) for k in range(len(words) - n + 1)]


def loops(text: str) -> bool:
    """Whether some word 4-gram occurs at least LOOP_REPEATS times in `text`."""
    counts = Counter(_ngrams(_words(text), LOOP_NGRAM))
    return bool(counts) and max(counts.values()) >= LOOP_REPEATS


def diagnostics(rows: Sequence[dict]) -> dict:
    """How answers degenerate, over every answer of `rows` (all seeds pooled): mean length in tokens, share
    that stopped at the token cap, corpus-level distinct-1/-2 (unique word n-grams / all word n-grams, Li et
    al. 2016) and share that loops (see `loops`). Percentages."""
    answers = [a for r in rows for a in (r.get("responses") or [r.get("response", "")])]
    if not answers:
        return {"answers": 0}
    words = [_words(a) for a in answers]

    def distinct(n: int) -> float | None:
        grams = [g for w in words for g in _ngrams(w, n)]
        return 100 * len(set(grams)) / len(grams) if grams else None

    return {"answers": len(answers),
            "mean_tokens": fmean(r.get("new_tokens", 0) / max(1, len(r.get("responses") or [1])) for r in rows),
            "hit_cap": 100 * fmean(r.get("finish_reason") == "length" for r in rows),
            "distinct_1": distinct(1), "distinct_2": distinct(2),
            "loops": 100 * fmean(loops(a) for a in answers)}
