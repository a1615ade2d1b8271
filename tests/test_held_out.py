"""Evaluation prompts are never trained on (issue 14, item 3): a recipe whose prune calibration or recover
training prompts share a prompt (by normalized text, not id) with an evaluation set stops in its preflight,
before any model loads or anything is written; `prune.calib_skip` and `recover.skip_prompts` avoid it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import run_cli, write_jsonl
from dadpo.data import load_prompts
from dadpo.errors import DadpoError
from dadpo.pipeline import BENCH_METHODS, bench_plan, plan, preflight
from dadpo.prune.config import PruneConfig
from dadpo.prune.importance import calibration_records
from dadpo.recipe import load_recipe, validate_recipe
from dadpo.recover.config import RecoverConfig
from dadpo.recover.pipeline import split_prompts

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _recipe_file(tmp_path: Path, **sections) -> Path:
    data = {"name": "r", "output_dir": str(tmp_path / "run"), "teacher": "smollm2-135m-instruct",
            "student": "smollm2-135m-instruct", **sections}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _refused(capsys, *args: str) -> str:
    code, _, err = run_cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- the stages' own choice of prompts, as pure functions ---------------------------------------------------

def test_split_prompts_skips_then_holds_out_then_trains():
    recs = [f"r{i}" for i in range(10)]
    train, held = split_prompts(recs, RecoverConfig(skip_prompts=3, eval_prompts=2, train_prompts=4), "p")
    assert held == ["r3", "r4"] and train == ["r5", "r6", "r7", "r8"]
    assert split_prompts(recs, RecoverConfig(eval_prompts=2), "p") == (recs[2:], recs[:2])  # default: no skip
    with pytest.raises(DadpoError, match=r"--prompts p: no training prompts left \(10 prompts, 9 skipped, 1 held"):
        split_prompts(recs, RecoverConfig(skip_prompts=9, eval_prompts=1), "p")


def test_calibration_records_sample_after_the_skipped_rows(tmp_path):
    calib = write_jsonl(tmp_path / "c.jsonl", [{"id": str(i), "prompt": f"question {i}"} for i in range(40)])
    plain = calibration_records(PruneConfig(calib=str(calib), calib_samples=8, seed=3))
    assert plain == calibration_records(PruneConfig(calib=str(calib), calib_samples=8, seed=3))  # deterministic
    skipped = calibration_records(PruneConfig(calib=str(calib), calib_samples=30, calib_skip=10, seed=3))
    assert len(skipped) == 30 and min(int(r.id) for r in skipped) >= 10
    with pytest.raises(DadpoError, match="calib_skip: 40 skips every one of the 40 prompts"):
        calibration_records(PruneConfig(calib=str(calib), calib_skip=40))


def test_cli_flags_come_from_the_configs(capsys):
    from dadpo.cli import build_parser
    from dadpo.recover.cli import config_from_args

    parser = build_parser()
    args = parser.parse_args(["recover", "--student", "s", "--teacher", "t", "--prompts", "p", "--out", "o",
                              "--skip-prompts", "300"])
    assert config_from_args(args).skip_prompts == 300
    assert parser.parse_args(["prune", "--model", "m", "--out", "o"]).calib_skip == 0
    assert parser.parse_args(["prune", "--model", "m", "--out", "o", "--calib-skip", "80"]).calib_skip == 80
    for cmd, flag, field in (("recover", "--skip-prompts", RecoverConfig.model_fields["skip_prompts"]),
                             ("prune", "--calib-skip", PruneConfig.model_fields["calib_skip"])):
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert flag in text and " ".join(field.description.split())[:40] in text


# -- the check, through the real commands -------------------------------------------------------------------

def test_recover_training_on_evaluations_dolly_rows_is_refused(capsys, tmp_path, data_aliases, no_model):
    recover = {"method": "dsft", "eval_prompts": 16, "train_prompts": 64}  # the demo's split before the fix
    path = _recipe_file(tmp_path, prompts="dolly", recover=recover, evaluate={"sets": ["dolly"], "judge": None})
    line = _refused(capsys, "run", str(path))
    assert line == ("dadpo run: error: evaluate.sets: 64 of the 80 prompts of dolly are also recover training "
                    "prompts (prompts: dolly), e.g. id '16'; evaluation prompts must never be trained on: skip the "
                    "rows evaluation holds out with recover.skip_prompts, or evaluate other prompts")
    assert not (tmp_path / "run").exists()
    # `dadpo bench` plans its own recover stages (one per method): the same check stops it
    assert "are also bench/recover-dsft training prompts" in _refused(capsys, "bench", str(path), "--methods",
                                                                      "none,dsft,dadpo")
    assert not (tmp_path / "run").exists()
    # a larger held-out part reaches further: skipping 80 rows is not enough for dolly_heldout 300
    line = _refused(capsys, "run", str(path), "--set", "recover.skip_prompts=80", "--set",
                    "evaluate.dolly_heldout=300")
    assert "64 of the 300 prompts of dolly are also recover training prompts" in line
    code, _, err = run_cli(capsys, "run", str(path), "--dry-run", "--set", "recover.skip_prompts=300", "--set",
                           "evaluate.dolly_heldout=300")
    assert code == 0, err
    code, _, err = run_cli(capsys, "run", str(path), "--dry-run", "--set", "recover.skip_prompts=80")
    assert code == 0, err


def test_prune_calibration_on_evaluation_prompts_is_refused(capsys, tmp_path, no_model):
    rows = [{"id": f"c{i}", "prompt": f"Calibration question number {i}?"} for i in range(20)]
    calib = write_jsonl(tmp_path / "calib.jsonl", rows)
    # the evaluation set holds the calibration file's first 5 rows under other ids, case and spacing
    copies = [{"id": f"e{i}", "prompt": "  " + r["prompt"].upper().replace(" ", "\n "), "reference": "x"}
              for i, r in enumerate(rows[:5])]
    evals = write_jsonl(tmp_path / "eval.jsonl", copies)
    path = _recipe_file(tmp_path, student="prune", prune={"calib": str(calib), "calib_samples": 20},
                        evaluate={"sets": [f"mine={evals}"], "judge": None})
    line = _refused(capsys, "run", str(path))
    assert line.startswith("dadpo run: error: evaluate.sets: 5 of the 5 prompts of mine are also prune calibration "
                           f"prompts (prune.calib: {calib}), e.g. id 'e")
    assert "(id 'c" in line and line.endswith("with prune.calib_skip, or evaluate other prompts")
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli(capsys, "run", str(path), "--dry-run", "--set", "prune.calib_skip=5",
                           "--set", "prune.calib_samples=15")
    assert code == 0, err
    line = _refused(capsys, "run", str(path), "--set", "prune.calib_skip=20")
    assert line == f"dadpo run: error: prune.calib_skip: 20 skips every one of the 20 prompts of {calib}"


def test_a_set_of_ones_own_copying_a_training_row_is_caught_by_text(capsys, tmp_path, data_aliases, no_model):
    row = load_prompts("dolly")[500]
    copy = {"id": "mine-1", "prompt": "\n".join(row.user_turns[0].upper().split()), "answer": "whatever"}
    evals = write_jsonl(tmp_path / "mine.jsonl", [{"id": "mine-0", "prompt": "Not a Dolly prompt at all."}, copy])
    path = _recipe_file(tmp_path, prompts="dolly", recover={"method": "dsft", "skip_prompts": 80},
                        evaluate={"sets": ["dolly", f"mine={evals}"], "judge": None})
    line = _refused(capsys, "run", str(path))
    assert ("evaluate.sets: 1 of the 2 prompts of mine are also recover training prompts (prompts: dolly), "
            "e.g. id 'mine-1' (id '500' there)") in line
    assert not (tmp_path / "run").exists()


def test_no_overlap_to_find_without_training_or_evaluation(tmp_path, data_aliases):
    only_eval = validate_recipe({"name": "r", "output_dir": str(tmp_path / "a"), "student": "smollm2-135m-instruct",
                                 "evaluate": {"sets": ["dolly"], "judge": None}})
    preflight(only_eval, plan(only_eval))
    no_eval = validate_recipe({"name": "r", "output_dir": str(tmp_path / "b"), "student": "smollm2-135m-instruct",
                               "recover": {}})
    preflight(no_eval, plan(no_eval))
    # a skip that leaves nothing to train on fails in the preflight all the same
    too_far = no_eval.model_copy(update={"recover": RecoverConfig(skip_prompts=15011)})
    with pytest.raises(DadpoError, match=r"^prompts: dolly: no training prompts left \(15011 prompts, 15011 skipped"):
        preflight(too_far, plan(too_far))


DEMO_WITH_DOLLY = ["evaluate.sets=[dolly, vicuna_bench]", "evaluate.dolly_heldout=300", "evaluate.limit=null"]


@pytest.mark.parametrize(("name", "overrides"), [
    *[(p.name, []) for p in sorted(RECIPES.glob("*.yaml"))],
    ("smollm2-135m-prune20-dadpo.yaml", DEMO_WITH_DOLLY),  # the demo evaluating Dolly's held-out 300 rows
], ids=lambda v: v if isinstance(v, str) else ("dolly-300" if v else "as-shipped"))
def test_shipped_recipes_train_on_no_evaluation_prompt(name, overrides, data_aliases):
    from dadpo.pipeline import _check_held_out

    recipe = load_recipe(RECIPES / name, overrides)
    _check_held_out(recipe, plan(recipe))
    _check_held_out(recipe, bench_plan(recipe, list(BENCH_METHODS)))
