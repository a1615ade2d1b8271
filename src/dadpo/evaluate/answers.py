"""Evaluation answers (cached, resumable), pairwise judgement items, and ROUGE-L against references."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from dadpo.data import PromptRecord, load_prompts
from dadpo.decoding import GenerationConfig
from dadpo.errors import DadpoError
from dadpo.evaluate.config import DOLLY_HELDOUT, EVAL_SETS, SET_NAME, EvalConfig, split_set
from dadpo.evaluate.judge import PairItem
from dadpo.generation import AnswerJob, generate_to_files
from dadpo.models import model_stamp


def load_eval_set(entry: str, limit: int | None = None, dolly_heldout: int = DOLLY_HELDOUT,
                  data_dir: str | None = None) -> list[PromptRecord]:
    """The prompts of an evaluation set, first `limit` of them: a built-in name (dolly: the Dolly file's
    first `dolly_heldout` rows) or NAME=PATH, a prompt file or folder of any format `load_prompts` reads.
    A built-in set resolves under `data_dir` (default $DADPO_DATA_DIR, else the hub). A missing or unreadable
    set is a one-line DadpoError naming it."""
    name, path = split_set(entry)
    if path is None:
        if name not in EVAL_SETS:
            raise DadpoError(f"unknown evaluation set {name!r}; choose from {', '.join(EVAL_SETS)}, "
                             "or give NAME=PATH")
        records = load_prompts(name, data_dir=data_dir)
        if name == "dolly":
            records = records[:dolly_heldout]
        return records[:limit]
    if not SET_NAME.fullmatch(name) or name in EVAL_SETS or not path:
        raise DadpoError(f"evaluation set {entry!r}: expected NAME=PATH with a NAME of letters, digits, _ or - "
                         "that is not a built-in set")
    if not Path(path).expanduser().exists():
        raise DadpoError(f"evaluation set {name!r}: {path} not found (NAME=PATH takes a prompt file or folder)")
    try:
        records = load_prompts(str(Path(path).expanduser()))
    except DadpoError as e:
        raise DadpoError(f"evaluation set {name!r}: {e}") from None
    return records[:limit]


def load_eval_sets(config: EvalConfig) -> dict[str, list[PromptRecord]]:
    """Every set of `config.sets` by its display name (a built-in name, or the NAME of NAME=PATH)."""
    return {split_set(s)[0]: load_eval_set(s, config.limit, config.dolly_heldout, config.data_dir)
            for s in config.sets}


def has_references(records: list[PromptRecord] | list[dict]) -> bool:
    """Whether a set carries reference answers (so gets ROUGE-L): some record, or answer row, has one."""
    return any(r.get("reference") if isinstance(r, dict) else r.reference for r in records)


def spec_hash(spec: str) -> str:
    return hashlib.sha256(str(spec).encode()).hexdigest()[:8]


def model_slug(name: str, spec: str) -> str:
    """A folder name for a model's cached outputs: readable name + hash of the spec it was loaded from.
    The folder stays when the weights change; what is inside is checked against `model_stamp`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"
    return f"{safe}-{spec_hash(spec)}"


def answer_config(config: EvalConfig, seed: int | None = None) -> GenerationConfig:
    """The generation settings of evaluation answers under sampling seed `seed` (default: the first), part of
    every cached answer row's stamp."""
    return GenerationConfig.of(config.generation, config.seeds[0] if seed is None else seed)


def answer_file(folder: Path, set_name: str, seed: int, config: EvalConfig) -> Path:
    """`<set>.jsonl` for greedy answers, `<set>.seed<k>.jsonl` for those sampled under seed k."""
    return folder / (f"{set_name}.seed{seed}.jsonl" if config.generation.temperature > 0 else f"{set_name}.jsonl")


def generate_answers(
    model,
    tok,
    name: str,
    spec: str,
    out_dir: str | os.PathLike,
    config: EvalConfig,
    prompts: dict[str, list[PromptRecord]],
    progress: bool = True,
) -> dict[str, dict[int, list[dict]]]:
    """Answer every set in `prompts` once per seed of `config.answer_seeds` into
    `out_dir/answers/<slug>/<set>[.seed<k>].jsonl`: set -> seed -> rows. All of them come from one queue
    (`generate_to_files`). Resumes and never pays twice; answers of other decoding settings or other weights
    behind the same spec are redone."""
    folder = Path(out_dir) / "answers" / model_slug(name, spec)
    keys = [(s, seed) for s, recs in prompts.items() for seed in config.answer_seeds(has_references(recs))]
    jobs = [AnswerJob(prompts[s], answer_config(config, seed), answer_file(folder, s, seed, config))
            for s, seed in keys]
    rows = generate_to_files(model, tok, jobs, model_name=model_stamp(spec), replace_stale=True, progress=progress)
    answers: dict[str, dict[int, list[dict]]] = {s: {} for s in prompts}
    for (s, seed), file_rows in zip(keys, rows, strict=True):
        answers[s][seed] = file_rows
    return answers


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
