"""Run a recipe: prune → recover → evaluate, each stage in `<output_dir>/<stage>/` with a manifest.

A stage's manifest holds the hash of its config and inputs (upstream hashes included). A rerun skips a
stage whose manifest hash matches, reruns a changed stage and, through the hashes, everything downstream.
The manifest is written (atomically) only after the stage finished, so a half-done stage is never taken
as done: a killed stage is resumed when its `.pending` hash matches (training restarts from its last
checkpoint), and started afresh otherwise.

Ownership: dadpo deletes or replaces only what it can prove it made. The proof of a stage folder is the
runner's own record of that stage: its `manifest.json` naming the stage (finished), or its pending note
`.<stage>.pending.json` beside it (started; written *before* the folder is created). An empty folder holds
nothing to lose. Any other file, link or folder at a stage's path stops the run with a one-line `DadpoError`
naming it, before anything is touched; so does a `recipe.json` in `output_dir` that is not a recipe record
(and, for `dadpo bench`, a table or plot in `bench/` without dadpo's bench.json: `dadpo.bench.check_bench_dir`).
`preflight` runs every check that needs no model (paths, ownership, data sets, no evaluation prompt among the
prune calibration or recover training prompts, model specs that are cheap to resolve) before a run writes or
deletes anything. `check_removable` is the last guard of every folder dadpo
deletes, here and in `dadpo prune`/`dadpo recover --overwrite`: never a symbolic link, the current
directory, a parent of it, the home folder or a filesystem root.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dadpo.distributed import agree, barrier, init_from_env, is_main, on_main
from dadpo.errors import DadpoError
from dadpo.io import atomic_write_json, check_removable, hold_output, read_json_object
from dadpo.reuse import content_key

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
    models: list[str] = field(default_factory=list)  # model specs read from outside the run (see stage_hash)


def stage_hash(stage: Stage, upstream_hashes: dict[str, str]) -> str:
    """Hash of what a stage's result depends on: its config, its upstream stages' hashes and the content
    fingerprints of the models it reads from outside the run, so a model folder rewritten in place makes
    the stage run again instead of being taken as done. Computed only once the run's checks have passed
    (fingerprinting an alias hashes its GGUF)."""
    from dadpo.models import model_fingerprint

    return content_key({"name": stage.name, "config": stage.config,
                        "upstream": {u: upstream_hashes[u] for u in stage.upstream},
                        **({"weights": {m: model_fingerprint(m) for m in stage.models}} if stage.models else {})})


def read_manifest(stage_dir: Path) -> dict | None:
    return read_json_object(stage_dir / MANIFEST)


def _made_by_dadpo(d: Path, name: str) -> bool:
    """Whether stage folder `d` carries the runner's record of stage `name` (see the module docstring)."""
    manifest = read_manifest(d)
    return (manifest is not None and manifest.get("stage") == name) or read_json_object(pending_path(d)) is not None


def check_stage_dir(out: Path, name: str) -> None:
    """Refuse a path of stage `name` under `out` that dadpo cannot prove it made, or cannot create."""
    d = out / name
    for parent in list(d.parents)[: len(Path(name).parts) - 1]:  # bench/ of bench/evaluate
        if parent.exists() and not parent.is_dir():
            raise DadpoError(f"{parent} exists and is not a directory; move it or choose another output_dir")
    if not (d.exists() or d.is_symlink()):
        return
    if d.is_symlink() or not d.is_dir():
        raise DadpoError(f"{d} is in the way of stage {name!r} (a file or a link, not a folder dadpo made); "
                         "move it or choose another output_dir")
    if any(d.iterdir()) and not _made_by_dadpo(d, name):
        raise DadpoError(f"{d} exists but dadpo did not make it (no {MANIFEST} of stage {name!r} in it, no "
                         f"{pending_path(d).name} beside it); move it or choose another output_dir")


def check_stage_dirs(out: Path, stages: list[Stage]) -> None:
    for stage in stages:
        check_stage_dir(out, stage.name)


def _start_afresh(out: Path, name: str) -> None:
    """Delete stage `name`'s folder (changed config or inputs), once more proven to be dadpo's."""
    d = out / name
    if d.exists():
        check_stage_dir(out, name)
        check_removable(d, "stage folder")
        shutil.rmtree(d)


def run_stages(out: Path, stages: list[Stage], echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Run `stages` in order under `out`, skipping those already done with the same hash. Every stage path is
    checked first, so a folder dadpo did not make stops the run before any stage starts.
    Under N processes every stage runs on all of them (each stage splits its own work, see
    `dadpo.distributed`); what is done and what to resume is the main process's reading, and only the main
    process deletes, writes the records and echoes."""
    check_stage_dirs(out, stages)
    barrier()  # every process has looked before the main one deletes or writes anything
    hashes: dict[str, str] = {}
    results: dict[str, dict] = {}
    say = echo if is_main() else lambda _: None
    for k, stage in enumerate(stages, 1):
        h = hashes[stage.name] = stage_hash(stage, hashes)
        d = out / stage.name
        done = agree(read_manifest(d))
        if done and done.get("hash") == h:
            say(f"[{k}/{len(stages)}] {stage.name}: up to date ({h}), skipped")
            results[stage.name] = done["summary"]
            continue
        pending = pending_path(d)
        resume = agree((read_json_object(pending) or {}).get("hash") == h)

        def start(resume=resume, d=d, pending=pending, stage=stage, h=h):
            if not resume:
                _start_afresh(out, stage.name)
            atomic_write_json(pending, {"stage": stage.name, "hash": h, "config": stage.config})  # the proof
            d.mkdir(parents=True, exist_ok=True)

        on_main(start)
        say(f"[{k}/{len(stages)}] {stage.name}: {'resuming' if resume else 'running'} ({h})")
        t0 = time.time()
        summary = stage.run(d, resume)
        took = time.time() - t0

        def finish(d=d, pending=pending, stage=stage, h=h, summary=summary, took=took):
            atomic_write_json(d / MANIFEST, {"stage": stage.name, "hash": h, "config": stage.config,
                                             "upstream": {u: hashes[u] for u in stage.upstream},
                                             "seconds": round(took, 1), "finished": time.strftime("%FT%T%z"),
                                             "summary": summary})
            pending.unlink(missing_ok=True)

        on_main(finish)
        say(f"[{k}/{len(stages)}] {stage.name}: done in {took / 60:.1f} min")
        results[stage.name] = summary
    return results


def _dump(model) -> dict:
    return model.model_dump(mode="json") if model is not None else {}


def named_models(recipe: Recipe) -> list[str]:
    """The models a recipe reads from outside its run: the teacher, and a given (not pruned) student."""
    return [recipe.teacher] + ([] if recipe.pruned else [recipe.student])


def prune_stage(recipe: Recipe) -> Stage:
    def run(d: Path, resume: bool) -> dict:
        from dadpo.prune import prune_to_dir

        def prune() -> dict:  # once, on the main process; the others wait and then read its model
            report = prune_to_dir(recipe.teacher, d / "model", recipe.prune, overwrite=True, data_dir=recipe.data_dir)
            return {"model": str(d / "model"), **{k: report[k] for k in report if isinstance(report[k], int | float)}}

        return on_main(prune)

    return Stage("prune", {"teacher": recipe.teacher, **_dump(recipe.prune)}, run, models=named_models(recipe))


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
                              overwrite=not resume, reuse=[r for r in reuse if r.is_dir()],
                              data_dir=recipe.data_dir)
        return {"model": str(d / "model"), **metrics}

    return Stage(name, {"teacher": recipe.teacher, "student": recipe.student, "prompts": recipe.prompts,
                        **_dump(cfg)}, run, ["prune"] if recipe.pruned else [], named_models(recipe))


def evaluate_stage(recipe: Recipe, students: dict[str, str], upstream: list[str],
                   name: str = "evaluate", reuse: list[Path] = ()) -> Stage:
    """Evaluate `students` against the teacher; `reuse` lists sibling evaluate runs whose cached answers,
    metrics and verdicts of the same models are copied in instead of recomputed."""
    def run(d: Path, resume: bool) -> dict:
        from dadpo.evaluate import run_evaluate

        return run_evaluate(students, recipe.teacher, d, recipe.evaluate, reuse=reuse, data_dir=recipe.data_dir)

    return Stage(name, {"teacher": recipe.teacher, "students": students, **_dump(recipe.evaluate)},
                 run, upstream, named_models(recipe))


def plan(recipe: Recipe) -> list[Stage]:
    """The stages a recipe asks for, in data-flow order."""
    out = Path(recipe.output_dir)
    stages: list[Stage] = []
    students: dict[str, str] = {}
    if recipe.pruned:
        stages.append(prune_stage(recipe))
        students["pruned"] = student_path(recipe, out)
    elif recipe.student:
        students["student"] = recipe.student
    if recipe.recover:
        stages.append(recover_stage(recipe, out))
        students[f"{recipe.recover.method}"] = str(out / "recover" / "model")
    if recipe.evaluate:
        stages.append(evaluate_stage(recipe, students, [s.name for s in stages]))
    return stages


BENCH_METHODS = ("none", "dsft", "kd", "dpo", "dadpo")


def split_methods(text: str) -> list[str]:
    """`--methods` items: split on commas outside brackets, so `dadpo@lora.target_modules=[q_proj,v_proj]`
    stays one item."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [m.strip() for m in items if m.strip()]


def bench_variants(methods: list[str], base: dict) -> list[tuple[str, object]]:
    """(label, RecoverConfig) per method of `dadpo bench --methods`, in the order the stages must run.

    An item is a method name, optionally with recover settings after `@`: `dadpo@beta2=0.003`,
    `dadpo@margin=mean@beta2=0.01`, `kd@kd.kind=rev` (any `recover:` field, dotted for sections; values
    parsed as YAML). The label is the item as written. `none` (no recovery) has no config; dsft-like work
    comes first because every later method uses its dSFT model as π_ref. Unknown methods, fields or values
    are one DadpoError naming the item."""
    from dadpo.recipe import apply_overrides
    from dadpo.recover.config import RecoverConfig

    out: list[tuple[str, object]] = []
    for item in methods:
        method, *settings = item.split("@")
        if method not in BENCH_METHODS:
            raise DadpoError(f"--methods: unknown method {method!r} in {item!r}; choose from "
                             f"{', '.join(BENCH_METHODS)} (settings after @, e.g. dadpo@beta2=0.01)")
        if method == "none" and settings:
            raise DadpoError(f"--methods {item}: none (no recovery) takes no settings")
        if any(s.partition("=")[0].strip() == "method" for s in settings):
            raise DadpoError(f"--methods {item}: the method is the name before @, not a setting")
        if any(label == item for label, _ in out):
            raise DadpoError(f"--methods: {item} is listed twice")
        data = apply_overrides(json.loads(json.dumps(base)), settings, flag=f"--methods {item}:")
        data["method"] = method
        out.append((item, None if method == "none" else
                    RecoverConfig.parse(data, name=lambda loc, item=item: f"--methods {item}: recover.{loc}")))
    return sorted(out, key=lambda v: BENCH_METHODS.index(v[0].split("@")[0]))


def bench_plan(recipe: Recipe, methods: list[str]) -> list[Stage]:
    """Prune once, recover once per method (sharing teacher answers, dSFT and scores), evaluate all.

    `methods` are `bench_variants` items; `none` is the student without recovery. A variant whose settings
    leave the shared work unchanged (β, margin, lr, epochs, KD weighting…) reuses it from its siblings.
    Work that `dadpo run` of the same recipe already did (its recover/ and evaluate/ dirs) is reused too.
    """
    from dadpo.recover.config import RecoverConfig

    out = Path(recipe.output_dir)
    base = (recipe.recover or RecoverConfig()).model_dump(mode="json")
    stages = [prune_stage(recipe)] if recipe.pruned else []
    students: dict[str, str] = {}
    runs: list[Path] = [out / "recover"]
    for label, cfg in bench_variants(methods, base):
        if cfg is None:
            students[label] = student_path(recipe, out)
            continue
        d = out / "bench" / f"recover-{label}"
        stages.append(recover_stage(recipe, out, f"bench/recover-{label}", cfg, reuse=list(runs)))
        students[label] = str(d / "model")
        runs.append(d)
    stages.append(evaluate_stage(recipe, students, [s.name for s in stages], "bench/evaluate",
                                 reuse=[out / "evaluate"]))
    return stages


RECIPE_RECORD = "recipe.json"


def check_output_dir(out: Path) -> None:
    """`out` is a directory, or one that can be made, that this user can write to."""
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise DadpoError(f"output_dir: {existing} exists and is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DadpoError(f"output_dir: {existing} is not writable")
    record = out / RECIPE_RECORD
    if record.exists() and not {"name", "output_dir"} <= (read_json_object(record) or {}).keys():
        raise DadpoError(f"output_dir: {record} exists and is not a recipe record dadpo wrote; move it or "
                         "choose another output_dir")


def _check_datasets(recipe: Recipe, stages: list[Stage]) -> None:
    """Load every prompt set the stages will read (under the recipe's data_dir); errors name the recipe key."""
    from dadpo.data import load_prompts
    from dadpo.evaluate.answers import load_eval_set
    from dadpo.prune.api import needs_calibration

    folders = [("data_dir", recipe.data_dir), ("evaluate.data_dir", recipe.evaluate and recipe.evaluate.data_dir)]
    for key, folder in folders:
        if folder and not Path(folder).expanduser().is_dir():
            raise DadpoError(f"{key}: {folder} is not a directory")
    sets = [("prune.calib", recipe.prune.calib)] if recipe.prune and needs_calibration(recipe.prune) else []
    if any("prompts" in s.config for s in stages):  # a recover stage (bench recovers without a recover: section)
        sets.append(("prompts", recipe.prompts))
    for key, source in sets:
        try:
            load_prompts(source, data_dir=recipe.data_dir)
        except DadpoError as e:
            raise DadpoError(f"{key}: {e}") from None
    for entry in recipe.evaluate.sets if recipe.evaluate else []:
        try:
            load_eval_set(entry, recipe.evaluate.limit, recipe.evaluate.dolly_heldout, _eval_data_dir(recipe))
        except DadpoError as e:
            raise DadpoError(f"evaluate.sets: {e}") from None


def _eval_data_dir(recipe: Recipe) -> str | None:
    """Where the evaluate stage reads its sets, tasks and corpora: its own data_dir, else the recipe's."""
    return recipe.evaluate.data_dir or recipe.data_dir


def _check_held_out(recipe: Recipe, stages: list[Stage]) -> None:
    """Refuse a run that would calibrate the pruning or train the recovery on a prompt it evaluates on (e.g.
    Dolly rows of `evaluate.dolly_heldout`), before any model loads. Prompts are compared by their
    normalized text (`dadpo.data.prompt_text`), not ids, so a copy of a training row in a set of one's own
    is caught too. The records are chosen by the stages' own functions, `calibration_records` (prune) and
    `split_prompts` (recover), so the check sees exactly what they will use (and a `calib_skip` or
    `skip_prompts` that leaves no prompt fails here too, evaluation or not)."""
    from dadpo.data import load_prompts, shared_prompts
    from dadpo.evaluate.answers import load_eval_sets
    from dadpo.prune.api import needs_calibration
    from dadpo.prune.importance import calibration_records
    from dadpo.recover.config import RecoverConfig
    from dadpo.recover.pipeline import split_prompts

    uses: list[tuple[str, str, list]] = []  # (what the prompts are used for, the key that skips rows, records)
    if recipe.prune and any(s.name == "prune" for s in stages) and needs_calibration(recipe.prune):
        try:
            uses.append((f"prune calibration prompts (prune.calib: {recipe.prune.calib})", "prune.calib_skip",
                         calibration_records(recipe.prune, recipe.data_dir)))
        except DadpoError as e:
            raise DadpoError(f"prune.{e}") from None
    recovers = [s for s in stages if "prompts" in s.config]  # bench recovers without a recover: section
    records = load_prompts(recipe.prompts, data_dir=recipe.data_dir) if recovers else []
    splits = set()
    for stage in recovers:
        cfg = RecoverConfig.model_validate({k: stage.config[k] for k in RecoverConfig.model_fields})
        if (split := (cfg.skip_prompts, cfg.eval_prompts, cfg.train_prompts)) in splits:
            continue  # bench: every method trains on the same prompts
        splits.add(split)
        train, _ = split_prompts(records, cfg, recipe.prompts, key="prompts:")
        uses.append((f"{stage.name} training prompts (prompts: {recipe.prompts})", "recover.skip_prompts", train))
    if not (uses and recipe.evaluate and recipe.evaluate.sets):
        return
    eval_config = recipe.evaluate.model_copy(update={"data_dir": _eval_data_dir(recipe)})
    for name, recs in load_eval_sets(eval_config).items():
        for what, skip, used in uses:
            if shared := shared_prompts(recs, used):
                rec, twin = shared[0]
                same = f" (id {twin.id!r} there)" if twin.id != rec.id else ""
                raise DadpoError(f"evaluate.sets: {len(shared)} of the {len(recs)} prompts of {name} are also "
                                 f"{what}, e.g. id {rec.id!r}{same}; evaluation prompts must never be trained "
                                 f"on: skip the rows evaluation holds out with {skip}, or evaluate other prompts")


def _check_models(recipe: Recipe) -> None:
    """Resolve the model specs that resolve cheaply (local folders, hub ids); a GGUF or an alias is converted
    on first use, which is the stage's work."""
    from dadpo.embedded import EMBEDDED_MODELS
    from dadpo.models import resolve_model

    specs = [("teacher", recipe.teacher)] + ([] if recipe.pruned else [("student", recipe.student)])
    judge = recipe.evaluate and recipe.evaluate.judge
    if judge and judge.kind == "local":
        specs.append(("evaluate.judge.model", judge.model))
    for key, spec in specs:
        if spec in EMBEDDED_MODELS or spec.endswith(".gguf"):
            continue
        try:
            resolve_model(spec)
        except DadpoError as e:
            raise DadpoError(f"{key}: {e}") from None


def preflight(recipe: Recipe, stages: list[Stage]) -> None:
    """Everything a run can check without loading a model, before it writes or deletes anything: the output
    paths and who made what is there, the data sets, that no evaluation prompt is trained or calibrated on,
    and the model specs that resolve cheaply."""
    out = Path(recipe.output_dir)
    check_output_dir(out)
    check_stage_dirs(out, stages)
    _check_datasets(recipe, stages)
    _check_held_out(recipe, stages)
    _check_models(recipe)


def run_recipe(recipe: Recipe, echo: Callable[[str], None] = print, stages: list[Stage] | None = None,
               finish: Callable[[dict[str, dict]], None] | None = None) -> dict[str, dict]:
    """Run a recipe's stages (default: `plan(recipe)`) under its output_dir, once `preflight` passed, holding
    the output_dir throughout (`hold_output`); `finish(results)` writes what comes after, still holding it."""
    stages = stages if stages is not None else plan(recipe)
    preflight(recipe, stages)
    init_from_env()  # under torchrun / accelerate launch: the stages split their work across the processes
    out = Path(recipe.output_dir)
    with hold_output(out, "output_dir"):
        on_main(lambda: (out.mkdir(parents=True, exist_ok=True),
                         atomic_write_json(out / RECIPE_RECORD, recipe.model_dump(mode="json"))))
        results = run_stages(out, stages, echo)
        if finish is not None:
            finish(results)
        return results
