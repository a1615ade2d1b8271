"""The stage runner: manifests, skip on unchanged hash, rerun downstream on change, resume after a kill."""

from __future__ import annotations

import json
import shutil

import pytest

from dadpo.pipeline import MANIFEST, Stage, pending_path, run_stages


class Recorder:
    """Stages that write a file and record each call (the runner, not the stages, is under test)."""

    def __init__(self, wipe: bool = False):
        self.calls: list[tuple[str, bool]] = []
        self.fail_in: str | None = None
        self.wipe = wipe  # like run_recover(overwrite=True): a fresh start clears the stage's own directory

    def stage(self, name, config, upstream=()):
        def run(d, resume):
            self.calls.append((name, resume))
            if self.wipe and not resume:
                shutil.rmtree(d)
                d.mkdir()
            (d / "work.txt").write_text(f"{name}:{config}")
            if self.fail_in == name:
                raise KeyboardInterrupt  # a kill mid-stage
            return {"value": config.get("x", 0)}

        return Stage(name, dict(config), run, list(upstream))


def plan(rec, x=1, y=2, z=3):
    return [rec.stage("prune", {"x": x}), rec.stage("recover", {"x": y}, ["prune"]),
            rec.stage("evaluate", {"x": z}, ["prune", "recover"])]


def test_rerun_skips_unchanged_and_reruns_changed_plus_downstream(tmp_path):
    rec = Recorder()
    lines = []
    run_stages(tmp_path, plan(rec), lines.append)
    assert [c[0] for c in rec.calls] == ["prune", "recover", "evaluate"]
    for name in ("prune", "recover", "evaluate"):
        m = json.loads((tmp_path / name / MANIFEST).read_text())
        assert m["stage"] == name and len(m["hash"]) == 16 and not pending_path(tmp_path / name).exists()
    rec.calls.clear()
    results = run_stages(tmp_path, plan(rec), lines.append)
    assert rec.calls == [] and results["recover"] == {"value": 2}
    assert sum("skipped" in line for line in lines) == 3
    rec.calls.clear()
    run_stages(tmp_path, plan(rec, y=5), lines.append)  # recover changed → recover and evaluate rerun
    assert [c[0] for c in rec.calls] == ["recover", "evaluate"]
    rec.calls.clear()
    run_stages(tmp_path, plan(rec, x=7, y=5), lines.append)  # upstream change ripples down
    assert [c[0] for c in rec.calls] == ["prune", "recover", "evaluate"]


@pytest.mark.parametrize("wipe", [False, True])
def test_killed_stage_resumes_and_is_never_taken_as_done(tmp_path, wipe):
    rec = Recorder(wipe)
    rec.fail_in = "recover"
    with pytest.raises(KeyboardInterrupt):
        run_stages(tmp_path, plan(rec), lambda s: None)
    assert not (tmp_path / "recover" / MANIFEST).exists() and pending_path(tmp_path / "recover").exists()
    rec.fail_in, rec.calls = None, []
    run_stages(tmp_path, plan(rec), lambda s: None)
    assert rec.calls == [("recover", True), ("evaluate", False)]  # same hash: resumed, prune not redone


def test_killed_stage_with_changed_config_starts_afresh(tmp_path):
    rec = Recorder()
    rec.fail_in = "recover"
    with pytest.raises(KeyboardInterrupt):
        run_stages(tmp_path, plan(rec), lambda s: None)
    (tmp_path / "recover" / "stale.bin").write_text("old")
    rec.fail_in, rec.calls = None, []
    run_stages(tmp_path, plan(rec, y=9), lambda s: None)
    assert rec.calls[0] == ("recover", False) and not (tmp_path / "recover" / "stale.bin").exists()


def test_summary_headline_flattens_one_level():
    from dadpo.pipeline_cli import _headline

    summary = {"start": {"nll": 2.23617, "tokens": 1177}, "final": {"reward_acc": 0.875, "nll": 2.12954},
               "method": "dadpo", "model": "/x/model", "layer_widths": [1, 2]}
    assert _headline(summary) == {"start.nll": 2.2362, "final.reward_acc": 0.875, "final.nll": 2.1295,
                                  "method": "dadpo"}


def test_a_model_folder_rewritten_in_place_changes_every_stage_hash(tmp_path):
    """The stages name models by path; their weights' fingerprints make a rewritten folder a new input."""
    from dadpo.pipeline import plan as recipe_plan
    from dadpo.pipeline import stage_hash
    from dadpo.recipe import validate_recipe

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    (teacher / "model.safetensors").write_bytes(b"old weights")
    recipe = validate_recipe({"name": "r", "output_dir": str(tmp_path / "out"), "teacher": str(teacher),
                              "student": str(teacher), "recover": {}, "evaluate": {"sets": ["dolly"]}})

    def hashes():
        done: dict[str, str] = {}
        for stage in recipe_plan(recipe):
            done[stage.name] = stage_hash(stage, done)
        return done

    before = hashes()
    assert hashes() == before  # stable while nothing changes
    (teacher / "model.safetensors").unlink()
    (teacher / "model.safetensors").write_bytes(b"new weights")
    after = hashes()
    assert set(after) == {"recover", "evaluate"} and all(after[k] != before[k] for k in after)
