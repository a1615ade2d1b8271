"""dadpo deletes or replaces only what it can prove it made, and checks everything that needs no model first.

Every refusal is one line, exit 2, with the user's files byte for byte as they were. The recipe commands must
refuse before any model is resolved: `$DADPO_CACHE` points at an empty folder that a GGUF conversion would fill.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dadpo.cli import main
from dadpo.pipeline import MANIFEST, Stage, pending_path, run_stages

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-prune20-dadpo.yaml"


def snapshot(root: Path) -> dict[str, object]:
    """Every path under `root` with its content (files), target (links) or None (folders)."""
    tree: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            tree[rel] = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
    return tree


def user_file(path: Path, text: str = "my notes") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def no_models(tmp_path, monkeypatch):
    """An empty model cache: a command that resolved the embedded model would convert its GGUF into it."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DADPO_CACHE", str(cache))
    monkeypatch.delenv("DADPO_DATA_DIR", raising=False)
    yield
    assert not cache.exists(), "a model was resolved before the refusal"


def dadpo_stage(out: Path, name: str) -> None:
    """A stage folder the runner made (manifest and all) with another config than any recipe's: a real run
    would start this stage afresh, deleting the folder."""
    def work(d: Path, resume: bool) -> dict:
        (d / "weights.bin").write_text("an earlier run")
        return {}

    run_stages(out, [Stage(name, {"earlier": True}, work)], lambda s: None)


# ---------------------------------------------------------------- the four recipe commands

def _run(out: Path, data: Path) -> list[str]:
    return ["run", str(RECIPE), "--out", str(out), "--set", f"data_dir={data}"]


def _demo(out: Path, data: Path) -> list[str]:
    return ["demo", "--out", str(out), "--data-dir", str(data)]


def _bench(out: Path, data: Path) -> list[str]:
    return ["bench", str(RECIPE), "--methods", "none,dadpo", "--out", str(out), "--set", f"data_dir={data}"]


def _prune_recover(out: Path, data: Path) -> list[str]:
    return ["prune-recover", "--out", str(out), "--data-dir", str(data)]


#: (command line, its last stage: the folder the issue's `evaluate/notes.md` repro maps to)
COMMANDS = {"run": (_run, "evaluate"), "demo": (_demo, "evaluate"), "bench": (_bench, "bench/evaluate"),
            "prune-recover": (_prune_recover, "recover")}


@pytest.mark.parametrize("command", COMMANDS)
def test_user_folder_named_like_a_stage_is_kept_when_the_data_dir_is_missing(command, tmp_path, capsys, no_models):
    """The issue's repro: `evaluate/notes.md` in output_dir, data dir missing → exit 2 and notes.md is kept."""
    argv, last = COMMANDS[command]
    out = tmp_path / "out"
    user_file(out / "evaluate" / "notes.md")
    user_file(out / last / "notes.md")
    before = snapshot(out)
    err = one_line_error(capsys, main(argv(out, tmp_path / "missing-data")))
    assert str(out / last) in err and "did not make it" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_data_dir_stops_the_run_before_dadpos_own_stale_stage_is_deleted(command, tmp_path, capsys,
                                                                                 no_models):
    """All validation comes first: an earlier run's prune/ that this run would redo outlives a bad data dir."""
    argv, _ = COMMANDS[command]
    out = tmp_path / "out"
    dadpo_stage(out, "prune")
    before = snapshot(out)
    err = one_line_error(capsys, main(argv(out, tmp_path / "missing-data")))
    assert f"data_dir: {tmp_path / 'missing-data'} is not a directory" in err
    assert snapshot(out) == before  # no recipe.json either: nothing is written before validation passed


@pytest.mark.parametrize("command", COMMANDS)
def test_foreign_prune_folder_is_refused_untouched_when_everything_else_is_valid(command, tmp_path, capsys,
                                                                                 data_dir, no_models):
    argv, _ = COMMANDS[command]
    out = tmp_path / "out"
    user_file(out / "prune" / "model" / "config.json", "{}")
    user_file(out / "prune" / "notes.md")
    before = snapshot(out)
    err = one_line_error(capsys, main(argv(out, data_dir)))
    assert f"{out / 'prune'} exists but dadpo did not make it" in err
    assert snapshot(out) == before


def test_dry_run_validates_data_and_writes_nothing(tmp_path, capsys, data_dir, no_models):
    """The same checks pass on valid input (so the refusal above is about the folder), and fail on a bad set."""
    out = tmp_path / "out"
    assert main([*_run(out, data_dir), "--dry-run"]) == 0
    assert not out.exists()
    capsys.readouterr()
    bad = [*_run(out, data_dir), "--set", f"prompts={tmp_path / 'nope.jsonl'}", "--dry-run"]
    err = one_line_error(capsys, main(bad))
    assert "prompts: dataset not found" in err and not out.exists()


@pytest.mark.parametrize("case", ["stage is a file", "stage is a link", "recipe.json", "bench table",
                                  "output_dir is a file"])
def test_other_things_in_the_way_are_refused_untouched(case, tmp_path, capsys, data_dir, no_models):
    out = tmp_path / "out"
    argv = _bench(out, data_dir) if case == "bench table" else _run(out, data_dir)
    named = {"stage is a file": out / "recover", "stage is a link": out / "evaluate",
             "recipe.json": out / "recipe.json", "bench table": out / "bench" / "table.md",
             "output_dir is a file": out}[case]
    if case == "stage is a link":
        user_file(tmp_path / "elsewhere" / "notes.md")
        out.mkdir()
        named.symlink_to(tmp_path / "elsewhere")
    else:
        user_file(named, "{}" if case == "recipe.json" else "mine")
    before = snapshot(tmp_path)
    err = one_line_error(capsys, main(argv))
    assert str(named) in err
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- the stage runner on its own

def _stage(name: str, calls: list[str]) -> Stage:
    def work(d: Path, resume: bool) -> dict:
        calls.append(name)
        (d / "work.txt").write_text(name)
        return {}

    return Stage(name, {"x": 1}, work)


def test_runner_refuses_a_foreign_late_stage_before_running_the_first(tmp_path):
    from dadpo.errors import DadpoError

    user_file(tmp_path / "evaluate" / "notes.md")
    calls: list[str] = []
    with pytest.raises(DadpoError, match="did not make it"):
        run_stages(tmp_path, [_stage("prune", calls), _stage("evaluate", calls)], lambda s: None)
    assert calls == [] and not (tmp_path / "prune").exists()
    assert (tmp_path / "evaluate" / "notes.md").read_text() == "my notes"


def test_runner_takes_an_empty_folder_and_restarts_its_own_stale_stage(tmp_path):
    (tmp_path / "prune").mkdir()
    calls: list[str] = []
    run_stages(tmp_path, [_stage("prune", calls)], lambda s: None)  # an empty folder holds nothing to lose
    assert calls == ["prune"] and json.loads((tmp_path / "prune" / MANIFEST).read_text())["stage"] == "prune"
    dadpo_stage(tmp_path, "prune")  # changed config: dadpo's own folder is started afresh
    assert not (tmp_path / "prune" / "work.txt").exists() and (tmp_path / "prune" / "weights.bin").is_file()
    assert not pending_path(tmp_path / "prune").exists()


def test_runner_never_deletes_the_current_directory(tmp_path, monkeypatch):
    from dadpo.errors import DadpoError

    dadpo_stage(tmp_path, "prune")
    monkeypatch.chdir(tmp_path / "prune")
    before = snapshot(tmp_path)
    with pytest.raises(DadpoError, match="current directory"):
        run_stages(tmp_path, [_stage("prune", [])], lambda s: None)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- prune --overwrite and recover --overwrite

def _prune(out: str) -> list[str]:
    return ["prune", "--model", "smollm2-135m-instruct", "--out", out, "--overwrite", "--ppl-max-windows", "0"]


@pytest.fixture
def prompts(tmp_path) -> Path:
    return user_file(tmp_path / "prompts" / "p.jsonl", "".join(f'{{"prompt": "q{i}"}}\n' for i in range(4)))


def _recover(out: str, model: Path, prompts: Path) -> list[str]:
    return ["recover", "--student", str(model), "--teacher", str(model), "--prompts", str(prompts),
            "--out", out, "--overwrite", "--method", "dsft"]


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """cwd = tmp/work/sub: a project folder with its own files, inside a parent with files of its own."""
    sub = tmp_path / "work" / "sub"
    user_file(sub / "code.py", "print('mine')")
    user_file(tmp_path / "work" / "data.csv", "1,2")
    monkeypatch.chdir(sub)
    return sub


@pytest.mark.parametrize("target", ["foreign", "..", "."])
def test_prune_overwrite_refuses_foreign_folders_and_the_current_directory(target, tmp_path, work, capsys,
                                                                           no_models):
    if target == "foreign":
        user_file(tmp_path / "foreign" / "thesis.tex")
    out = str(tmp_path / "foreign") if target == "foreign" else target
    before = snapshot(tmp_path / "work"), snapshot(tmp_path / "foreign")
    err = one_line_error(capsys, main(_prune(out)))
    assert f"--out {out} " in err and "pruning.json" in err
    assert (snapshot(tmp_path / "work"), snapshot(tmp_path / "foreign")) == before


def test_prune_overwrite_never_replaces_the_current_directory_even_when_empty(tmp_path, monkeypatch, capsys,
                                                                              no_models):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    err = one_line_error(capsys, main(_prune(".")))
    assert "current directory" in err and (tmp_path / "empty").is_dir()


@pytest.mark.parametrize("target", ["foreign", "..", "."])
def test_recover_overwrite_refuses_foreign_folders(target, tmp_path, work, capsys, smollm_dir, prompts):
    if target == "foreign":
        user_file(tmp_path / "foreign" / "thesis.tex")
    out = str(tmp_path / "foreign") if target == "foreign" else target
    before = snapshot(tmp_path / "work"), snapshot(tmp_path / "foreign")
    err = one_line_error(capsys, main(_recover(out, smollm_dir, prompts)))
    assert f"--out {out} " in err and "not a recover run" in err
    assert (snapshot(tmp_path / "work"), snapshot(tmp_path / "foreign")) == before


def test_recover_overwrite_never_deletes_the_current_directory_even_when_it_is_a_run(work, capsys, smollm_dir,
                                                                                     prompts):
    """A recover run made in the current directory (its recover.json, as dadpo writes it) is still not deleted."""
    record = {"student": str(smollm_dir), "teacher": str(smollm_dir), "prompts": str(prompts), "config": {}}
    user_file(work / "recover.json", json.dumps(record))
    before = snapshot(work.parent)
    err = one_line_error(capsys, main(_recover(".", smollm_dir, prompts)))
    assert "--out . is the current directory" in err
    assert snapshot(work.parent) == before
