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
Each artefact is written under a temporary name and renamed when complete, so a killed run restarts at
the first missing artefact, and training resumes from its last Trainer checkpoint.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dadpo.data import PromptRecord, load_prompts
from dadpo.errors import DadpoError
from dadpo.generation import GenerationConfig, generate_to_file
from dadpo.io import atomic_write_json, check_removable, read_json_object
from dadpo.models import model_stamp
from dadpo.recover.config import RecoverConfig
from dadpo.recover.forward import response_logps, teacher_topk
from dadpo.recover.losses import dadpo_margins, teacher_term_stats
from dadpo.recover.pairs import PairCollator, encode_example, pair_logps

log = logging.getLogger(__name__)


def run_recover(student: str, teacher: str, prompts: str, out_dir: str | os.PathLike,
                config: RecoverConfig | dict | None = None, overwrite: bool = False,
                reuse: Sequence[str | os.PathLike] = ()) -> dict:
    """Recover `student` from `teacher` on `prompts` into `out_dir`; returns the metrics dict.

    `reuse`: other recover output dirs (e.g. the same recipe with another method); their method-independent
    artefacts (teacher/student responses, dSFT model, scores) are linked in when made with the same settings.
    """
    cfg = config if isinstance(config, RecoverConfig) else RecoverConfig.parse(config or {})
    out = Path(out_dir)
    train_recs, eval_recs = split_prompts(load_prompts(prompts), cfg, prompts)
    tok = check_same_vocab(student, teacher)
    # models by spec and content (`model_stamp`): a folder rewritten in place is another run, not this one
    manifest = {"student": model_stamp(student), "teacher": model_stamp(teacher), "prompts": str(prompts),
                "config": cfg.model_dump(mode="json")}
    _claim(out, manifest, overwrite)
    _link_shared(out, [Path(r) for r in reuse], manifest, cfg)
    if (out / "metrics.json").is_file() and (out / "model" / "config.json").is_file():
        log.info("%s is complete; nothing to do", out)
        return json.loads((out / "metrics.json").read_text())

    teacher_rows = _generate(teacher, train_recs + eval_recs, cfg, out / "teacher.jsonl")
    start_nll = _cached_json(out / "start_nll.json", lambda: _eval_nll(student, eval_recs, teacher_rows, cfg))

    sft = [_example(tok, r, teacher_rows, None, cfg) for r in train_recs]
    dsft_dir = _train(student, sft, cfg, "dsft", out / "dsft")
    if cfg.method == "dsft":
        final_dir = _copy_model(dsft_dir, out / "model")
    else:
        src = str(dsft_dir) if cfg.sampling.student_from == "dsft" else student
        student_rows = _generate(src, train_recs + eval_recs, cfg, out / "student.jsonl",
                                 name="dsft" if src != student else None) if cfg.needs_pairs else {}
        recs = train_recs + eval_recs
        examples = [_example(tok, r, teacher_rows, student_rows, cfg) for r in recs]
        scores = _score(out / "scores.pt", dsft_dir, teacher, examples, len(train_recs), cfg)
        train = [{**ex, **scores[ex["id"]]} for ex in examples[: len(train_recs)]]
        final_dir = _train(str(dsft_dir), train, cfg, cfg.method, out / "train", out / "model")

    metrics = {"start": start_nll, "method": cfg.method, "train_prompts": len(train_recs),
               "eval_prompts": len(eval_recs)}
    if eval_recs:
        metrics["dsft"] = _cached_json(out / "dsft_nll.json",
                                       lambda: _eval_nll(str(dsft_dir), eval_recs, teacher_rows, cfg))
        metrics["final"] = _eval_nll(str(final_dir), eval_recs, teacher_rows, cfg)
        if cfg.method != "dsft":
            metrics["final"].update(_eval_pairs(str(final_dir), examples[len(train_recs):], scores, cfg))
    if cfg.needs_pairs:  # how the teacher term acts: training pairs at the start, held-out pairs at the end
        start, u = _start_teacher_term(examples[: len(train_recs)], scores, cfg)
        metrics["teacher_term"] = {"start": start}
        us = {"start": u}
        if "teacher_term" in metrics.get("final", {}):
            metrics["teacher_term"]["end"] = metrics["final"].pop("teacher_term")
            us["end"] = metrics["final"].pop("u")
        _teacher_term_report(out, us, cfg)
    _training_curves(out, cfg)
    atomic_write_json(out / "metrics.json", metrics)
    log.info("recover done: %s", metrics)
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


def _claim(out: Path, manifest: dict, overwrite: bool) -> None:
    """Record what `out` is made with; refuse to mix settings in one run unless overwriting. Only a folder
    that holds dadpo's recover.json is a run: any other non-empty folder is refused, never taken over or
    deleted, and --overwrite never deletes a link, the current directory or a parent of it."""
    path = out / "recover.json"
    if out.exists() and not out.is_dir():
        raise DadpoError(f"--out {out} exists and is not a directory")
    old = read_json_object(path)
    ours = old is not None and {"student", "teacher", "prompts", "config"} <= old.keys()
    if not ours and out.is_dir() and any(out.iterdir()):
        raise DadpoError(f"--out {out} exists and is not a recover run (no recover.json of dadpo's in it); "
                         "--overwrite replaces only dadpo's own runs, so choose another --out")
    if ours and not overwrite:
        if old != manifest:
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            if "config" in diff:
                oc, nc = old.get("config", {}), manifest["config"]
                diff = [k for k in diff if k != "config"] + sorted(
                    f"config.{k}" for k in set(oc) | set(nc) if oc.get(k) != nc.get(k))
            raise DadpoError(f"--out {out} holds a run made with other settings ({', '.join(diff)}); "
                             f"use --overwrite or another --out")
        return
    if ours:
        check_removable(out, "--out")
        shutil.rmtree(out)
    atomic_write_json(path, manifest)


#: artefacts that do not depend on the last stage's method, β, lr, epochs or KD weighting
_SHARED = ("teacher.jsonl", "start_nll.json", "dsft", "dsft_nll.json", "student.jsonl", "scores.pt")
_METHOD_ONLY = ("method", "beta1", "beta2", "margin", "lr", "epochs", "kd", "activation_checkpointing",
                "save_steps", "logging_steps", "report_to")


def _shared_key(manifest: dict) -> dict:
    return {**manifest, "config": {k: v for k, v in manifest["config"].items() if k not in _METHOD_ONLY}}


def _link_shared(out: Path, reuse: list[Path], manifest: dict, cfg: RecoverConfig) -> None:
    """Symlink method-independent artefacts from sibling runs made with the same shared settings."""
    key = _shared_key(manifest)
    for other in reuse:
        path = other / "recover.json"
        if other.resolve() == out.resolve() or not path.is_file():
            continue
        if _shared_key(json.loads(path.read_text())) != key:
            continue
        for name in _SHARED:
            src, dst = other / name, out / name
            if dst.exists() or dst.is_symlink() or not src.exists():
                continue
            if name == "dsft" and not (src / "model" / "config.json").is_file():
                continue
            if name == "scores.pt" and not _scores_fit(torch.load(src, weights_only=True), cfg):
                continue
            os.symlink(src.resolve(), dst)
            log.info("reusing %s from %s", name, other)


def _scores_fit(scores: dict, cfg: RecoverConfig) -> bool:
    """Cached scores serve `cfg` if they hold rejected log-probs (pairs) and top-k (KD) where it needs them."""
    first = next(iter(scores.values()), {})
    return ((not cfg.needs_pairs or "ref_rejected_logps" in first)
            and (not cfg.needs_topk or first.get("topk_ids", torch.empty(0, 0)).shape[-1] == cfg.kd.top_k))


def _cached_json(path: Path, make) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    obj = make()
    atomic_write_json(path, obj)
    return obj


def _load(spec: str):
    from dadpo.models import load_model

    return load_model(spec)


def _generate(spec: str, records: list[PromptRecord], cfg: RecoverConfig, path: Path,
              name: str | None = None) -> dict[str, str]:
    """Responses of `spec` to every record (cached JSONL), as {id: response}."""
    from dadpo.io import read_jsonl

    if path.is_file():
        rows = read_jsonl(path)
        if {r["id"] for r in rows} >= {r.id for r in records}:
            return {r["id"]: r["response"] for r in rows}
    s = cfg.sampling
    gen = GenerationConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                           batch_size=s.batch_size, seed=cfg.seed, precision=s.precision)
    model, tok = _load(spec)
    rows = generate_to_file(model, tok, records, gen, path, model_name=name or model_stamp(spec))
    return {r["id"]: r["response"] for r in rows}


def _example(tok, rec: PromptRecord, chosen: dict[str, str], rejected: dict[str, str] | None,
             cfg: RecoverConfig) -> dict:
    return encode_example(tok, rec.id, rec.messages, chosen[rec.id], (rejected or {}).get(rec.id),
                          cfg.max_prompt_len, cfg.max_response_len)


def _batches(examples: list[dict], size: int, pad_id: int, desc: str, device: torch.device):
    """(examples, collated batch) in chunks of `size`, every tensor of the batch on `device` (the model's:
    a model on cuda never meets a cpu batch, cached scores included)."""
    collate = PairCollator(pad_id)
    for s in tqdm(range(0, len(examples), size), desc=desc, unit="batch"):
        chunk = examples[s:s + size]
        yield chunk, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(chunk).items()}


def _autocast(cfg: RecoverConfig):
    return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16,
                          enabled=cfg.bf16)


@torch.no_grad()
def _sequence_scores(spec: str, examples: list[dict], cfg: RecoverConfig, prefix: str, n_topk: int = 0) -> dict:
    """{id: {prefix_chosen_logps, prefix_rejected_logps[, topk_logps, topk_ids]}} under model `spec`;
    top-k only for the first `n_topk` examples (the training pairs)."""
    model, tok = _load(spec)
    scores: dict[str, dict] = {}
    topk_ids = {ex["id"] for ex in examples[:n_topk]} if cfg.needs_topk else set()
    for chunk, batch in _batches(examples, cfg.batch_size, tok.pad_token_id, f"score {prefix}", model.device):
        with _autocast(cfg):
            out = response_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        n = len(chunk)
        rejected = out.sums.shape[0] > n
        for i, ex in enumerate(chunk):
            row = scores.setdefault(ex["id"], {})
            row[f"{prefix}_chosen_logps"] = out.sums[i].item()
            if rejected:
                row[f"{prefix}_rejected_logps"] = out.sums[n + i].item()
        if any(ex["id"] in topk_ids for ex in chunk):
            chosen = out.rows < n
            rows = out.rows[chosen]
            with _autocast(cfg):
                v, ids = teacher_topk(model, out.hidden[chosen], cfg.kd.top_k)
            for i, ex in enumerate(chunk):
                sel = rows == i
                scores[ex["id"]]["topk_logps"] = v[sel].float().clone()
                scores[ex["id"]]["topk_ids"] = ids[sel].to(torch.int64).clone()
    return scores


def _score(path: Path, ref_dir: Path, teacher: str, examples: list[dict], n_train: int, cfg: RecoverConfig
           ) -> dict[str, dict]:
    """π_ref and π_te sequence log-probs of both responses per pair (teacher top-k for KD), cached in `path`."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    ref = _sequence_scores(str(ref_dir), examples, cfg, "ref")
    te = _sequence_scores(teacher, examples, cfg, "teacher", n_topk=n_train)
    scores = {k: {**ref[k], **te[k]} for k in ref}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(scores, tmp)
    os.replace(tmp, path)
    return scores


def training_args(cfg: RecoverConfig, stage: str, ckpt: Path, **overrides):
    """TrainingArguments of a stage (`overrides` win: benchmarks set max_steps, save_strategy)."""
    from transformers import TrainingArguments

    dsft = stage == "dsft"
    kwargs = dict(
        output_dir=str(ckpt), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.dsft.lr if dsft else cfg.lr,
        num_train_epochs=cfg.dsft.epochs if dsft else cfg.epochs, lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio, logging_steps=cfg.logging_steps, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=2, bf16=cfg.bf16, seed=cfg.seed, data_seed=cfg.seed,
        report_to="none" if cfg.report_to == "tensorboard" else cfg.report_to,  # tensorboard: `build_trainer`
        remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=False, weight_decay=0.0,
        optim="adamw_torch_fused",  # one fused kernel per step instead of foreach ops (~0.15 s of a 6 s CPU step)
        use_cpu=not torch.cuda.is_available())  # bf16 autocast on CPU needs use_cpu explicitly
    return TrainingArguments(**{**kwargs, **overrides})


def build_trainer(model, tok, examples: list[dict], cfg: RecoverConfig, stage: str, ckpt: Path, **overrides):
    """A `RecoverTrainer` for `stage` on `examples` (LoRA-wrapped when the config asks for it)."""
    from dadpo.recover.trainer import RecoverTrainer, enable_checkpointing

    enable_checkpointing(model, cfg.activation_checkpointing)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lc = cfg.lora
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules=lc.target_modules, task_type="CAUSAL_LM"))
    model.config.use_cache = False
    callbacks = []
    if cfg.report_to == "tensorboard":  # event files beside the stage's model, not under the checkpoints removed after
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(str(ckpt.parent / "tb"))))
    return RecoverTrainer(model=model, args=training_args(cfg, stage, ckpt, **overrides), train_dataset=examples,
                          data_collator=PairCollator(tok.pad_token_id), recover=cfg, stage=stage,
                          callbacks=callbacks)


def _train(spec: str, examples: list[dict], cfg: RecoverConfig, stage: str, work: Path,
           target: Path | None = None) -> Path:
    """Train `spec` on `examples` for `stage`, resuming from work/checkpoints; save the merged model."""
    target = target or work / "model"
    if (target / "config.json").is_file():
        return target
    ckpt = work / "checkpoints"
    model, tok = _load(spec)
    trainer = build_trainer(model, tok, examples, cfg, stage, ckpt)
    last = last_complete_checkpoint(ckpt)
    if last:
        log.info("%s: resuming from %s", stage, last)
    trainer.train(resume_from_checkpoint=last)
    atomic_write_json(work / "log_history.json", trainer.state.log_history)
    model = trainer.model
    if cfg.lora:
        model = model.merge_and_unload()
    _save_model(model, tok, target)
    shutil.rmtree(ckpt, ignore_errors=True)
    del trainer, model
    gc.collect()
    return target


def last_complete_checkpoint(ckpt: Path) -> str | None:
    """The newest Trainer checkpoint that was fully written (its trainer_state.json is saved last); newer,
    half-written ones left by a kill are removed so checkpoint rotation cannot delete the good one."""
    if not ckpt.is_dir():
        return None
    dirs = sorted((p for p in ckpt.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                  key=lambda p: int(p.name.split("-")[-1]))
    while dirs and not (dirs[-1] / "trainer_state.json").is_file():
        shutil.rmtree(dirs.pop())
    return str(dirs[-1]) if dirs else None


def _save_model(model, tok, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.chmod(0o755)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _copy_model(src: Path, target: Path) -> Path:
    if (target / "config.json").is_file():  # copied before a kill (the rename below is atomic)
        return target
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, target)
    return target


@torch.no_grad()
def _eval_nll(spec: str, records: list[PromptRecord], teacher_rows: dict[str, str], cfg: RecoverConfig) -> dict:
    """Per-token NLL of the held-out teacher responses under model `spec`."""
    if not records:
        return {}
    model, tok = _load(spec)
    examples = [encode_example(tok, r.id, r.messages, teacher_rows[r.id], None, cfg.max_prompt_len,
                               cfg.max_response_len) for r in records]
    total, count = 0.0, 0
    for _, batch in _batches(examples, cfg.batch_size, tok.pad_token_id, "held-out NLL", model.device):
        out = response_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        total -= out.tokens.sum().item()
        count += out.tokens.numel()
    return {"nll": total / count, "tokens": count}


@torch.no_grad()
def _eval_pairs(spec: str, examples: list[dict], scores: dict, cfg: RecoverConfig) -> dict:
    """Held-out pairs under the final model: mean Δ_ref/Δ_te, reward accuracy (Δ_ref > 0) and objective
    accuracy (β1·Δ_ref + β2·Δ_te > 0)."""
    if not examples or "rejected_ids" not in examples[0]:
        return {}
    model, tok = _load(spec)
    d_refs, d_tes = [], []
    examples = [{**ex, **{k: v for k, v in scores[ex["id"]].items() if k.endswith("_logps")}} for ex in examples]
    for chunk, b in _batches(examples, cfg.batch_size, tok.pad_token_id, "held-out pairs", model.device):
        with _autocast(cfg):  # the precision the cached π_ref/π_te scores were computed in
            out = response_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
        d_ref, d_te = dadpo_margins(*pair_logps(out.sums, out.counts, b, len(chunk), cfg.margin))
        d_refs.append(d_ref)
        d_tes.append(d_te)
    d_ref, d_te = torch.cat(d_refs), torch.cat(d_tes)
    beta2 = cfg.beta2 if cfg.method == "dadpo" else 0.0
    u = cfg.beta1 * d_ref + beta2 * d_te
    return {"reward_acc": (d_ref > 0).float().mean().item(), "objective_acc": (u > 0).float().mean().item(),
            "margin_ref": d_ref.mean().item(),
            "margin_te": d_te.mean().item(), "pairs": len(d_ref),
            "teacher_term": teacher_term_stats(d_ref, d_te, cfg.beta1, beta2), "u": u.tolist()}


def _start_teacher_term(examples: list[dict], scores: dict, cfg: RecoverConfig) -> tuple[dict, list[float]]:
    """`teacher_term_stats` and per-pair u of the training pairs as training starts: the policy is π_ref
    then, so Δ_ref = 0 and Δ_te = (log π_ref − log π_te)(y_c) − (…)(y_r), from the cached scores alone."""
    batch = {k: torch.tensor([scores[ex["id"]][k] for ex in examples], dtype=torch.float64)
             for k in ("ref_chosen_logps", "ref_rejected_logps", "teacher_chosen_logps", "teacher_rejected_logps")}
    counts = torch.tensor([len(ex["chosen_ids"]) for ex in examples] + [len(ex["rejected_ids"]) for ex in examples])
    sums = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    d_ref, d_te = dadpo_margins(*pair_logps(sums, counts, batch, len(examples), cfg.margin))
    beta2 = cfg.beta2 if cfg.method == "dadpo" else 0.0
    return teacher_term_stats(d_ref, d_te, cfg.beta1, beta2), (cfg.beta1 * d_ref + beta2 * d_te).tolist()


def _teacher_term_report(out: Path, u: dict[str, list[float]], cfg: RecoverConfig) -> None:
    """teacher_term.json (per-pair u at the start and end) and its plot, teacher_term.png."""
    from dadpo.recover.report import plot_teacher_term

    beta2 = cfg.beta2 if cfg.method == "dadpo" else 0.0
    atomic_write_json(out / "teacher_term.json", {"beta1": cfg.beta1, "beta2": beta2, "margin": cfg.margin, "u": u})
    history = out / "train" / "log_history.json"
    title = f"{cfg.method}: β1 = {cfg.beta1:g}, β2 = {beta2:g}, margin = {cfg.margin}"
    plot_teacher_term(out / "teacher_term.png", u, json.loads(history.read_text()) if history.is_file() else [],
                      title)


def _training_curves(out: Path, cfg: RecoverConfig) -> None:
    """training_curves.png from the stages' log histories (dSFT, then the method's own stage)."""
    from dadpo.recover.report import plot_training_curves

    histories = {stage: json.loads(p.read_text()) for stage, p in
                 (("dsft", out / "dsft" / "log_history.json"), (cfg.method, out / "train" / "log_history.json"))
                 if p.is_file()}
    plot_training_curves(out / "training_curves.png", histories, f"recover {cfg.method}: per-step training logs")
