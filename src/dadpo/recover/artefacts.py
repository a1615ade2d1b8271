"""The recover run folder: who made it (recover.json), what sibling runs share, cached files and models.

A run's shared artefacts (`SHARED`: teacher answers, dSFT model, student answers, scores, held-out NLLs)
are content-addressed (`artefact_keys`): a sibling run holding one under the same key lends it as a link
instead of it being made again (`link_shared`, as `dadpo bench` and method variants do).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dadpo.distributed import agree, on_main
from dadpo.errors import DadpoError
from dadpo.io import atomic_write_json, check_removable, read_json_object
from dadpo.recover.config import RecoverConfig
from dadpo.reuse import content_key

log = logging.getLogger(__name__)


def claim_run(out: Path, manifest: dict, overwrite: bool) -> None:
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


#: the artefacts a run may take from a sibling with the same key (`artefact_keys`)
SHARED = ("teacher.jsonl", "start_nll.json", "dsft", "dsft_nll.json", "student.jsonl", "scores.pt")

#: settings in no shared artefact's key: the last stage's own, logging, and what the method needs scored
#: (method, kd.weight, kd.top_k), which `scores_fit` checks on the scores themselves, so scores that hold
#: more (rejected log-probs and top-k) serve a run that needs less. Every other setting is in some key;
#: tests/test_reuse.py fails on a setting placed in neither.
FINAL_ONLY = ("method", "beta1", "beta2", "margin", "lr", "epochs", "kd.kind", "kd.weight", "kd.top_k",
              "kd.jsd_beta", "activation_checkpointing", "save_steps", "logging_steps", "report_to")


def artefact_keys(manifest: dict) -> dict[str, str]:
    """The content key of each shared artefact of the run `manifest` (recover.json) describes: a hash of the
    model stamps, prompts and artefacts it is made from and of exactly the settings its step reads."""
    c = manifest["config"]
    split = {k: c[k] for k in ("skip_prompts", "eval_prompts", "train_prompts")}
    sampling = {k: v for k, v in c["sampling"].items() if k != "student_from"}
    tokens = {k: c[k] for k in ("max_prompt_len", "max_response_len", "batch_size", "bf16")}  # every forward
    tokens["group_by_length"] = c.get("group_by_length", False)  # absent from runs made before it existed
    teacher = content_key({"teacher": manifest["teacher"], "prompts": manifest["prompts"], **split,
                           "sampling": sampling, "seed": c["seed"]})
    dsft = content_key({"student": manifest["student"], "teacher.jsonl": teacher, **tokens, "dsft": c["dsft"],
                        "lora": c["lora"], "grad_accum": c["grad_accum"], "warmup_ratio": c["warmup_ratio"],
                        "seed": c["seed"]})
    rejected_by = {"dsft": dsft} if c["sampling"]["student_from"] == "dsft" else {"student": manifest["student"]}
    student = content_key({**rejected_by, "prompts": manifest["prompts"], **split, "sampling": sampling,
                           "seed": c["seed"]})
    scores = content_key({"dsft": dsft, "teacher": manifest["teacher"], "teacher.jsonl": teacher, **tokens})
    return {"teacher.jsonl": teacher, "dsft": dsft, "student.jsonl": student, "scores.pt": scores,
            "start_nll.json": content_key({"student": manifest["student"], "teacher.jsonl": teacher, **tokens}),
            "dsft_nll.json": content_key({"dsft": dsft, "teacher.jsonl": teacher, **tokens})}


def link_shared(out: Path, reuse: list[Path], manifest: dict, cfg: RecoverConfig) -> None:
    """Symlink each shared artefact that a sibling run holds under the same key (and has finished). Scores
    are taken when they hold what `cfg` needs: the rejected log-probs of the same student answers (pairs)
    and teacher top-k of the same k (KD)."""
    ours = artefact_keys(manifest)
    for other in reuse:
        theirs = read_json_object(other / "recover.json")
        if other.resolve() == out.resolve() or theirs is None:
            continue
        try:
            keys = artefact_keys(theirs)
        except (KeyError, TypeError, ValueError):  # a run of an older dadpo: nothing to share
            continue
        for name in SHARED:
            src, dst = other / name, out / name
            if keys[name] != ours[name] or dst.exists() or dst.is_symlink() or not src.exists():
                continue
            if name == "dsft" and not (src / "model" / "config.json").is_file():
                continue
            if name == "scores.pt" and not (
                    scores_fit(torch.load(src, weights_only=True), cfg)
                    and (not cfg.needs_pairs or keys["student.jsonl"] == ours["student.jsonl"])):
                continue
            os.symlink(src.resolve(), dst)
            log.info("reusing %s from %s", name, other)


def scores_fit(scores: dict, cfg: RecoverConfig) -> bool:
    """Cached scores serve `cfg` if they hold rejected log-probs (pairs) and top-k (KD) where it needs them."""
    first = next(iter(scores.values()), {})
    return ((not cfg.needs_pairs or "ref_rejected_logps" in first)
            and (not cfg.needs_topk or first.get("topk_ids", torch.empty(0, 0)).shape[-1] == cfg.kd.top_k))


def cached_json(path: Path, make) -> dict:
    """`make()` (on every process: it may split its work), written once by the main process; read back when
    the file exists."""
    if agree(path.is_file()):
        return json.loads(path.read_text())
    obj = make()
    on_main(lambda: atomic_write_json(path, obj))
    return obj


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


def save_model(model, tok, target: Path, state_dict: dict | None = None) -> None:
    """`model` (with `state_dict`, e.g. weights gathered from FSDP shards) and `tok` as a from_pretrained folder."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
    tok.save_pretrained(tmp)
    tmp.chmod(0o755)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def copy_model(src: Path, target: Path) -> Path:
    if (target / "config.json").is_file():  # copied before a kill (the rename below is atomic)
        return target
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, target)
    return target
