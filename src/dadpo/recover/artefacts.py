"""The recover run folder: who made it (recover.json), what sibling runs share, cached files and models.

A run's method-independent artefacts (`SHARED`: teacher answers, dSFT model, student answers, scores)
depend on every setting except `METHOD_ONLY`; a sibling run made with the same other settings links them
instead of recomputing them (`link_shared`, as `dadpo bench` and method variants do).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dadpo.errors import DadpoError
from dadpo.io import atomic_write_json, check_removable, read_json_object
from dadpo.recover.config import RecoverConfig

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


#: artefacts that do not depend on the last stage's method, β, lr, epochs or KD weighting
SHARED = ("teacher.jsonl", "start_nll.json", "dsft", "dsft_nll.json", "student.jsonl", "scores.pt")


METHOD_ONLY = ("method", "beta1", "beta2", "margin", "lr", "epochs", "kd", "activation_checkpointing",
                "save_steps", "logging_steps", "report_to")


def shared_key(manifest: dict) -> dict:
    return {**manifest, "config": {k: v for k, v in manifest["config"].items() if k not in METHOD_ONLY}}


def link_shared(out: Path, reuse: list[Path], manifest: dict, cfg: RecoverConfig) -> None:
    """Symlink method-independent artefacts from sibling runs made with the same shared settings."""
    key = shared_key(manifest)
    for other in reuse:
        path = other / "recover.json"
        if other.resolve() == out.resolve() or not path.is_file():
            continue
        if shared_key(json.loads(path.read_text())) != key:
            continue
        for name in SHARED:
            src, dst = other / name, out / name
            if dst.exists() or dst.is_symlink() or not src.exists():
                continue
            if name == "dsft" and not (src / "model" / "config.json").is_file():
                continue
            if name == "scores.pt" and not scores_fit(torch.load(src, weights_only=True), cfg):
                continue
            os.symlink(src.resolve(), dst)
            log.info("reusing %s from %s", name, other)


def scores_fit(scores: dict, cfg: RecoverConfig) -> bool:
    """Cached scores serve `cfg` if they hold rejected log-probs (pairs) and top-k (KD) where it needs them."""
    first = next(iter(scores.values()), {})
    return ((not cfg.needs_pairs or "ref_rejected_logps" in first)
            and (not cfg.needs_topk or first.get("topk_ids", torch.empty(0, 0)).shape[-1] == cfg.kd.top_k))


def cached_json(path: Path, make) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    obj = make()
    atomic_write_json(path, obj)
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


def save_model(model, tok, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    model.save_pretrained(tmp)
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
