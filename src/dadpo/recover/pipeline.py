"""`run_recover`: the whole recover chain in one output directory, every sub-step resumable.

out_dir/
  recover.json             what the run was made with (a rerun with other settings is refused)
  teacher.jsonl            teacher responses (chosen), train + held-out prompts
  dsft/model               the student after distilled SFT = π_ref (dsft/checkpoints while training)
  student.jsonl            student responses (rejected), from dsft/model by default
  scores.pt                per pair: π_ref and π_te log-probs of both responses (+ teacher top-k)
  train/                   Trainer checkpoints and log history of the last stage
  model/                   the recovered student, LoRA merged: a plain `from_pretrained` directory
  metrics.json             held-out NLL of teacher responses (start / dSFT / final) and reward accuracy
  teacher_term.json/png    per-pair u = β1·Δ_ref + β2·Δ_te at the start and end (dDPO, daDPO)
  training_curves.png      per-step loss, margins and accuracies of every training stage
Each artefact is written under a temporary name and renamed when complete, so a killed run restarts at
the first missing artefact, and training resumes from its last Trainer checkpoint.

The pieces, in the order `run_recover` uses them: `artefacts` (the run folder, what siblings share),
`dadpo.generation` (answers), `training` (dSFT and the method's stage around `trainer.RecoverTrainer`,
whose loss is `losses` on `forward`'s log-probs of `pairs`' batches), `scoring` (π_ref/π_te scores),
`heldout` (metrics on held-out prompts), `report` (plots).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from dadpo.data import PromptRecord, load_prompts
from dadpo.decoding import GenerationConfig
from dadpo.distributed import agree, on_main
from dadpo.errors import DadpoError
from dadpo.generation import generate_to_file
from dadpo.io import atomic_write_json
from dadpo.models import load_model, model_stamp
from dadpo.recover.artefacts import cached_json, claim_run, copy_model, link_shared
from dadpo.recover.config import RecoverConfig
from dadpo.recover.heldout import heldout_nll, heldout_pairs, start_teacher_term
from dadpo.recover.pairs import encode_example
from dadpo.recover.report import write_teacher_term, write_training_curves
from dadpo.recover.scoring import score_pairs
from dadpo.recover.training import train_stage

log = logging.getLogger(__name__)


def run_recover(student: str, teacher: str, prompts: str, out_dir: str | os.PathLike,
                config: RecoverConfig | dict | None = None, overwrite: bool = False,
                reuse: Sequence[str | os.PathLike] = (), data_dir: str | None = None) -> dict:
    """Recover `student` from `teacher` on `prompts` into `out_dir`; returns the metrics dict.

    `reuse`: other recover output dirs (e.g. the same recipe with another method); their method-independent
    artefacts (teacher/student responses, dSFT model, scores) are linked in when made with the same settings.
    `data_dir`: the local data folder a prompt-set alias resolves under (default $DADPO_DATA_DIR, else the hub).
    """
    cfg = config if isinstance(config, RecoverConfig) else RecoverConfig.parse(config or {})
    out = Path(out_dir)
    train_recs, eval_recs = split_prompts(load_prompts(prompts, data_dir=data_dir), cfg, prompts)
    tok = check_same_vocab(student, teacher)
    # models by spec and content (`model_stamp`): a folder rewritten in place is another run, not this one
    manifest = {"student": model_stamp(student), "teacher": model_stamp(teacher), "prompts": str(prompts),
                "config": cfg.model_dump(mode="json")}
    on_main(lambda: (claim_run(out, manifest, overwrite),
                     link_shared(out, [Path(r) for r in reuse], manifest, cfg)))
    if agree((out / "metrics.json").is_file() and (out / "model" / "config.json").is_file()):
        log.info("%s is complete; nothing to do", out)
        return json.loads((out / "metrics.json").read_text())

    teacher_rows = _generate(teacher, train_recs + eval_recs, cfg, out / "teacher.jsonl")
    start_nll = cached_json(out / "start_nll.json", lambda: heldout_nll(student, eval_recs, teacher_rows, cfg))

    sft = [_example(tok, r, teacher_rows, None, cfg) for r in train_recs]
    dsft_dir = train_stage(student, sft, cfg, "dsft", out / "dsft")
    if cfg.method == "dsft":
        final_dir = on_main(lambda: copy_model(dsft_dir, out / "model"))
    else:
        src = str(dsft_dir) if cfg.sampling.student_from == "dsft" else student
        student_rows = _generate(src, train_recs + eval_recs, cfg, out / "student.jsonl",
                                 name="dsft" if src != student else None) if cfg.needs_pairs else {}
        recs = train_recs + eval_recs
        examples = [_example(tok, r, teacher_rows, student_rows, cfg) for r in recs]
        scores = score_pairs(out / "scores.pt", dsft_dir, teacher, examples, len(train_recs), cfg)
        train = [{**ex, **scores[ex["id"]]} for ex in examples[: len(train_recs)]]
        final_dir = train_stage(str(dsft_dir), train, cfg, cfg.method, out / "train", out / "model")

    metrics = {"start": start_nll, "method": cfg.method, "train_prompts": len(train_recs),
               "eval_prompts": len(eval_recs)}
    if eval_recs:
        metrics["dsft"] = cached_json(out / "dsft_nll.json",
                                      lambda: heldout_nll(str(dsft_dir), eval_recs, teacher_rows, cfg))
        metrics["final"] = heldout_nll(str(final_dir), eval_recs, teacher_rows, cfg)
        if cfg.method != "dsft":
            metrics["final"].update(heldout_pairs(str(final_dir), examples[len(train_recs):], scores, cfg))
    us = {}
    if cfg.needs_pairs:  # how the teacher term acts: training pairs at the start, held-out pairs at the end
        start, us["start"] = start_teacher_term(examples[: len(train_recs)], scores, cfg)
        metrics["teacher_term"] = {"start": start}
        if "teacher_term" in metrics.get("final", {}):
            metrics["teacher_term"]["end"] = metrics["final"].pop("teacher_term")
            us["end"] = metrics["final"].pop("u")

    def report():
        if us:
            write_teacher_term(out, us, cfg)
        write_training_curves(out, cfg)
        atomic_write_json(out / "metrics.json", metrics)
        log.info("recover done: %s", metrics)

    on_main(report)
    return metrics


def split_prompts(records: list[PromptRecord], cfg: RecoverConfig, source: str, key: str = "--prompts"
                  ) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(train, held-out) of a prompt set: the first `skip_prompts` records are ignored, the next `eval_prompts`
    held out, and the next `train_prompts` (default: the rest) trained on. Pure (no model), so a run's checks
    see exactly the prompts recover will train on."""
    kept = records[cfg.skip_prompts:]
    eval_recs = kept[: cfg.eval_prompts]
    rest = kept[cfg.eval_prompts:]
    train = rest[: cfg.train_prompts] if cfg.train_prompts else rest
    if not train:
        raise DadpoError(f"{key} {source}: no training prompts left ({len(records)} prompts, "
                         f"{cfg.skip_prompts} skipped, {cfg.eval_prompts} held out)")
    return train, eval_recs


def check_same_vocab(student: str, teacher: str):
    """daDPO's teacher scores student tokens, so both must tokenise identically; returns the tokenizer."""
    from dadpo.models import load_tokenizer

    tok = load_tokenizer(student)
    vs, vt = tok.get_vocab(), load_tokenizer(teacher).get_vocab()
    if vs != vt:
        raise DadpoError(f"--teacher {teacher} and --student {student} have different vocabularies "
                         f"({len(vt)} vs {len(vs)} tokens); daDPO needs a shared tokenizer")
    return tok


def _generate(spec: str, records: list[PromptRecord], cfg: RecoverConfig, path: Path,
              name: str | None = None) -> dict[str, str]:
    """Responses of `spec` to every record (cached JSONL), as {id: response}."""
    from dadpo.io import read_jsonl

    if agree(path.is_file() and {r["id"] for r in read_jsonl(path)} >= {r.id for r in records}):
        return {r["id"]: r["response"] for r in read_jsonl(path)}
    gen = GenerationConfig.of(cfg.sampling, cfg.seed)
    model, tok = load_model(spec)
    rows = generate_to_file(model, tok, records, gen, path, model_name=name or model_stamp(spec))
    return {r["id"]: r["response"] for r in rows}


def _example(tok, rec: PromptRecord, chosen: dict[str, str], rejected: dict[str, str] | None,
             cfg: RecoverConfig) -> dict:
    return encode_example(tok, rec.id, rec.messages, chosen[rec.id], (rejected or {}).get(rec.id),
                          cfg.max_prompt_len, cfg.max_response_len)
