"""Evaluation answers (cached, resumable), pairwise judgement items, and ROUGE-L against references."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from dadpo.data import PromptRecord, load_prompts
from dadpo.errors import DadpoError
from dadpo.evaluate.config import DOLLY_HELDOUT, EVAL_SETS, EvalConfig
from dadpo.evaluate.judge import PairItem
from dadpo.generation import GenerationConfig, generate_to_file
from dadpo.models import model_stamp


def load_eval_set(name: str, limit: int | None = None) -> list[PromptRecord]:
    """The prompts of an evaluation set (Dolly: its held-out head), first `limit` of them."""
    if name not in EVAL_SETS:
        raise DadpoError(f"unknown evaluation set {name!r}; choose from {', '.join(EVAL_SETS)}")
    records = load_prompts(name)
    if name == "dolly":
        records = records[:DOLLY_HELDOUT]
    return records[:limit]


def spec_hash(spec: str) -> str:
    return hashlib.sha256(str(spec).encode()).hexdigest()[:8]


def model_slug(name: str, spec: str) -> str:
    """A folder name for a model's cached outputs: readable name + hash of the spec it was loaded from.
    The folder stays when the weights change; what is inside is checked against `model_stamp`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"
    return f"{safe}-{spec_hash(spec)}"


def answer_config(config: EvalConfig) -> GenerationConfig:
    """The generation settings of evaluation answers (part of every cached answer row's stamp)."""
    g = config.generation
    return GenerationConfig(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                            batch_size=g.batch_size, seed=g.seed, precision=g.precision)


def generate_answers(
    model,
    tok,
    name: str,
    spec: str,
    out_dir: str | os.PathLike,
    config: EvalConfig,
    prompts: dict[str, list[PromptRecord]],
    progress: bool = True,
) -> dict[str, list[dict]]:
    """Answer every set in `prompts` into `out_dir/answers/<slug>/<set>.jsonl` (resumes, never pays twice;
    answers of other generation settings or other weights behind the same spec are redone)."""
    cfg = answer_config(config)
    folder = Path(out_dir) / "answers" / model_slug(name, spec)
    stamp = model_stamp(spec)
    return {
        s: generate_to_file(
            model, tok, recs, cfg, folder / f"{s}.jsonl", model_name=stamp, replace_stale=True,
            progress=progress,
        )
        for s, recs in prompts.items()
    }


def pair_items(
    set_name: str, student: list[dict], teacher: list[dict]
) -> list[tuple[dict, PairItem, PairItem]]:
    """For each question and assistant turn: (meta, student-as-A item, teacher-as-A item)."""
    by_id = {r["id"]: r for r in teacher}
    out = []
    for s in student:
        t = by_id.get(s["id"])
        if t is None:
            raise DadpoError(f"{set_name}: teacher has no answer for question {s['id']}")
        for turn in range(len(s["responses"])):
            conv_s, conv_t = _upto_turn(s["messages"], turn), _upto_turn(t["messages"], turn)
            ref = s.get("reference") if turn == 0 else None
            base = f"{set_name}/{s['id']}/t{turn + 1}"
            meta = {"set": set_name, "id": s["id"], "turn": turn + 1, "category": s.get("category")}
            out.append(
                (
                    meta,
                    PairItem(f"{base}/student-first", conv_s, conv_t, ref),
                    PairItem(f"{base}/teacher-first", conv_t, conv_s, ref),
                )
            )
    return out


def _upto_turn(messages: list[dict], turn: int) -> list[dict]:
    """Messages up to and including the assistant reply to user turn `turn` (0-based)."""
    seen = -1
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            seen += 1
            if seen == turn:
                return messages[: k + 1]
    raise DadpoError(f"conversation has no assistant reply for turn {turn + 1}")


def rouge_l(rows: list[dict]) -> dict | None:
    """Mean ROUGE-L F1 (%) of answers against reference answers, over rows that have one."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(r["reference"], r["response"])["rougeL"].fmeasure for r in rows if r.get("reference")
    ]
    return {"rougeL": 100 * sum(scores) / len(scores), "n": len(scores)} if scores else None
