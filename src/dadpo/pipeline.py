"""Run a recipe: prune → recover → evaluate, each stage in `<output_dir>/<stage>/` with a manifest.

A stage's manifest holds the hash of its config and inputs (upstream hashes included). A rerun skips a
stage whose manifest hash matches, reruns a changed stage and, through the hashes, everything downstream.
The manifest is written (atomically) only after the stage finished, so a half-done stage is never taken
as done: a killed stage is resumed when its `.pending` hash matches (training restarts from its last
checkpoint), and started afresh otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dadpo.io import atomic_write_json

if TYPE_CHECKING:
    from dadpo.recipe import Recipe

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PENDING = ".pending.json"


def pending_path(stage_dir: Path) -> Path:
    """Where the runner notes a started stage: beside its directory, so a stage that wipes its own
    directory when starting afresh (as `run_recover` does) cannot erase the note that makes it resumable."""
    return stage_dir.parent / f".{stage_dir.name}{PENDING}"


@dataclass
class Stage:
    """One step of a run: `run(stage_dir, resume)` does the work and returns a JSON-able summary."""

    name: str
    config: dict
    run: Callable[[Path, bool], dict]
    upstream: list[str] = field(default_factory=list)


def stage_hash(stage: Stage, upstream_hashes: dict[str, str]) -> str:
    blob = json.dumps({"name": stage.name, "config": stage.config,
                       "upstream": {u: upstream_hashes[u] for u in stage.upstream}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(stage_dir: Path) -> dict | None:
    path = stage_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def run_stages(out: Path, stages: list[Stage], echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Run `stages` in order under `out`, skipping those already done with the same hash."""
    hashes: dict[str, str] = {}
    results: dict[str, dict] = {}
    for k, stage in enumerate(stages, 1):
        h = hashes[stage.name] = stage_hash(stage, hashes)
        d = out / stage.name
        done = read_manifest(d)
        if done and done.get("hash") == h:
            echo(f"[{k}/{len(stages)}] {stage.name}: up to date ({h}), skipped")
            results[stage.name] = done["summary"]
            continue
        pending = pending_path(d)
        resume = pending.is_file() and json.loads(pending.read_text()).get("hash") == h
        if not resume and d.exists():
            shutil.rmtree(d)  # changed config or inputs: start this stage afresh
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(pending, {"hash": h, "config": stage.config})
        echo(f"[{k}/{len(stages)}] {stage.name}: {'resuming' if resume else 'running'} ({h})")
        t0 = time.time()
        summary = stage.run(d, resume)
        took = time.time() - t0
        atomic_write_json(d / MANIFEST, {"stage": stage.name, "hash": h, "config": stage.config,
                                         "upstream": {u: hashes[u] for u in stage.upstream},
                                         "seconds": round(took, 1), "finished": time.strftime("%FT%T%z"),
                                         "summary": summary})
        pending.unlink(missing_ok=True)
        echo(f"[{k}/{len(stages)}] {stage.name}: done in {took / 60:.1f} min")
        results[stage.name] = summary
    return results


@contextmanager
def data_dir_env(data_dir: str | None):
    """Point dataset aliases at `data_dir` for the duration of a run."""
    old = os.environ.get("DADPO_DATA_DIR")
    if data_dir:
        os.environ["DADPO_DATA_DIR"] = str(Path(data_dir).expanduser().resolve())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DADPO_DATA_DIR", None)
        else:
            os.environ["DADPO_DATA_DIR"] = old


def _dump(model) -> dict:
    return model.model_dump(mode="json") if model is not None else {}


def prune_stage(recipe: Recipe, out: Path) -> Stage:
    def run(d: Path, resume: bool) -> dict:
        from dadpo.prune import prune_to_dir

        report = prune_to_dir(recipe.teacher, d / "model", recipe.prune, overwrite=True)
        return {"model": str(d / "model"), **{k: report[k] for k in report if isinstance(report[k], int | float)}}

    return Stage("prune", {"teacher": recipe.teacher, **_dump(recipe.prune)}, run)


def student_path(recipe: Recipe, out: Path) -> str:
    return str(out / "prune" / "model") if recipe.pruned else recipe.student


def recover_stage(recipe: Recipe, out: Path, name: str = "recover", config=None,
                  reuse: list[Path] = ()) -> Stage:
    """Recover the student; `reuse` lists sibling runs whose method-independent work (teacher answers,
    dSFT model, student answers, scores) is linked in instead of recomputed."""
    cfg = config or recipe.recover

    def run(d: Path, resume: bool) -> dict:
        from dadpo.recover import run_recover

        metrics = run_recover(student_path(recipe, out), recipe.teacher, recipe.prompts, d, cfg,
                              overwrite=not resume, reuse=[r for r in reuse if r.is_dir()])
        return {"model": str(d / "model"), **metrics}

    return Stage(name, {"teacher": recipe.teacher, "student": recipe.student, "prompts": recipe.prompts,
                        **_dump(cfg)}, run, ["prune"] if recipe.pruned else [])


def evaluate_stage(recipe: Recipe, out: Path, students: dict[str, str], upstream: list[str],
                   name: str = "evaluate", reuse: list[Path] = ()) -> Stage:
    """Evaluate `students` against the teacher; `reuse` lists sibling evaluate runs whose cached answers,
    metrics and verdicts of the same models are copied in instead of recomputed."""
    def run(d: Path, resume: bool) -> dict:
        from dadpo.evaluate import run_evaluate

        return run_evaluate(students, recipe.teacher, d, recipe.evaluate, reuse=reuse)

    return Stage(name, {"teacher": recipe.teacher, "students": students, **_dump(recipe.evaluate)},
                 run, upstream)


def plan(recipe: Recipe) -> list[Stage]:
    """The stages a recipe asks for, in data-flow order."""
    out = Path(recipe.output_dir)
    stages: list[Stage] = []
    students: dict[str, str] = {}
    if recipe.pruned:
        stages.append(prune_stage(recipe, out))
        students["pruned"] = student_path(recipe, out)
    elif recipe.student:
        students["student"] = recipe.student
    if recipe.recover:
        stages.append(recover_stage(recipe, out))
        students[f"{recipe.recover.method}"] = str(out / "recover" / "model")
    if recipe.evaluate:
        stages.append(evaluate_stage(recipe, out, students, [s.name for s in stages]))
    return stages


BENCH_METHODS = ("none", "dsft", "kd", "dpo", "dadpo")


def bench_plan(recipe: Recipe, methods: list[str]) -> list[Stage]:
    """Prune once, recover once per method (sharing teacher answers, dSFT and scores), evaluate all.

    `none` is the student without recovery. dsft runs first: its dSFT model is every later method's π_ref.
    Work that `dadpo run` of the same recipe already did (its recover/ and evaluate/ dirs) is reused too.
    """
    from dadpo.recover.config import RecoverConfig

    out = Path(recipe.output_dir)
    base = (recipe.recover or RecoverConfig()).model_dump()
    stages = [prune_stage(recipe, out)] if recipe.pruned else []
    students = {"none": student_path(recipe, out)} if "none" in methods else {}
    runs: list[Path] = [out / "recover"]
    for m in sorted((m for m in methods if m != "none"), key=BENCH_METHODS.index):
        cfg = RecoverConfig.parse({**base, "method": m})
        d = out / "bench" / f"recover-{m}"
        stages.append(recover_stage(recipe, out, f"bench/recover-{m}", cfg, reuse=list(runs)))
        students[m] = str(d / "model")
        runs.append(d)
    stages.append(evaluate_stage(recipe, out, students, [s.name for s in stages], "bench/evaluate",
                                 reuse=[out / "evaluate"]))
    return stages


def run_recipe(recipe: Recipe, echo: Callable[[str], None] = print, stages: list[Stage] | None = None
               ) -> dict[str, dict]:
    """Run a recipe's stages (default: `plan(recipe)`) under its output_dir."""
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "recipe.json", recipe.model_dump(mode="json"))
    with data_dir_env(recipe.data_dir):
        return run_stages(out, stages if stages is not None else plan(recipe), echo)
