"""Recipe validation: every shipped recipe loads; every bad one fails early with a one-line YAML-path error."""

from __future__ import annotations

import copy
import re
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dadpo.cli import main
from dadpo.errors import DadpoError
from dadpo.recipe import Recipe, load_recipe, validate_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
BASE = {
    "name": "t", "output_dir": "OUT", "teacher": "smollm2-135m-instruct", "student": "prune",
    "prune": {"ratio": 0.2}, "recover": {"method": "dadpo", "beta1": 0.1, "beta2": 0.1},
    "evaluate": {"sets": ["vicuna_bench"]},
}


def test_three_recipes_ship():
    names = {p.name for p in RECIPES}
    assert {"smollm2-135m-prune20-dadpo.yaml", "vicuna7b-prune20-dadpo.yaml",
            "qwen2.5-1.5b-from-7b-dadpo.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and recipe.recover is not None


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["recover"].update(beat2=0.1), "recover.beat2: unknown key; did you mean recover.beta2?"),
        (lambda d: d.update(teacherr="x"), "teacherr: unknown key; did you mean teacher?"),
        (lambda d: d["recover"].update(beta2=-1), "recover.beta2:"),
        (lambda d: d["recover"].update(beta1="big"), "recover.beta1:"),
        (lambda d: d["prune"].update(ratio=1.5), "prune.ratio:"),
        (lambda d: d["recover"].update(method="ppo"), "recover.method:"),
        (lambda d: d["evaluate"].update(sets=["nope"]), "evaluate.sets:"),
        (lambda d: d.pop("name"), "name: required key is missing"),
        (lambda d: d.pop("prune"), "prune: section missing, but student is `prune`"),
    ],
)
def test_errors_name_the_yaml_path(edit, expected):
    data = copy.deepcopy(BASE)
    edit(data)
    with pytest.raises(DadpoError) as e:
        validate_recipe(data, "r.yaml")
    msg = str(e.value)
    assert msg.startswith("r.yaml: ") and expected in msg and "\n" not in msg


def test_overrides_and_bad_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    r = load_recipe(path, ["recover.beta2=0.3", "recover.lora.r=4", "evaluate.sets=[mt_bench, dolly]"])
    assert r.recover.beta2 == 0.3 and r.recover.lora.r == 4 and r.evaluate.sets == ["mt_bench", "dolly"]
    assert r.recover.seed == 0  # the recipe seed flows into sections
    with pytest.raises(DadpoError, match="recover.beta2"):
        load_recipe(path, ["recover.beta2=-0.5"])
    with pytest.raises(DadpoError, match="expected KEY.PATH=VALUE"):
        load_recipe(path, ["recover.beta2"])
    path.write_text("name: [unclosed\n")
    with pytest.raises(DadpoError, match="invalid YAML at line"):
        load_recipe(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(DadpoError, match="YAML mapping"):
        load_recipe(path)
    with pytest.raises(DadpoError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")


# -- fuzzing: 200 bad recipes through the real CLI entry point -------------------------------------------
_KEYS = ["name", "output_dir", "teacher", "student", "prompts", "seed", "prune", "recover", "evaluate",
         "prune.ratio", "prune.importance", "recover.method", "recover.beta1", "recover.beta2", "recover.lr",
         "recover.epochs", "recover.batch_size", "recover.lora", "evaluate.sets", "evaluate.tasks",
         "evaluate.limit", "evaluate.judge", "evaluate.judge.kind"]
_BAD_VALUES = st.one_of(
    st.just(-1), st.just(0), st.just(-0.5), st.just(1e9), st.just(""), st.just([]), st.just({"x": 1}),
    st.just(None), st.just("not-a-number"), st.just([1, 2]), st.just(True), st.text(string.ascii_letters, max_size=5),
)


def _mutations():
    typo = st.tuples(st.just("typo"), st.sampled_from(_KEYS), st.text(string.ascii_lowercase, min_size=1, max_size=3))
    bad = st.tuples(st.just("value"), st.sampled_from(_KEYS), _BAD_VALUES)
    drop = st.tuples(st.just("drop"), st.sampled_from(["name", "output_dir", "prune"]), st.none())
    return st.lists(st.one_of(typo, bad, drop), min_size=1, max_size=3)


def _apply(data: dict, muts) -> dict:
    for kind, key, arg in muts:
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        if kind == "typo":
            node[leaf + "_" + arg] = 1
        elif kind == "value":
            node[leaf] = arg
        else:
            node.pop(leaf, None)
    return data


def _is_valid(data) -> bool:
    try:
        validate_recipe(data)
        return True
    except DadpoError:
        return False


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.filter_too_much])
@given(muts=_mutations())
def test_fuzzed_bad_recipes_fail_cleanly(tmp_path_factory, capsys, muts):
    tmp = tmp_path_factory.mktemp("fuzz")
    out = tmp / "OUT"
    data = _apply({**copy.deepcopy(BASE), "output_dir": str(out)}, muts)
    assume(not _is_valid(data))  # a mutation can land on a valid value (e.g. seed=0): not a bad recipe
    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["run", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"dadpo run: error: {path}: ")
    assert re.match(r"[A-Za-z_][\w.]*: ", lines[0].split(f"{path}: ", 1)[1]), lines[0]  # names a YAML path
    assert not out.exists()
