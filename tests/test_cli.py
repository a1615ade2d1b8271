"""The `dadpo` command line as a user runs it: real subprocesses, exit codes, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def dadpo(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "dadpo", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_help_at_every_level():
    top = dadpo("--help")
    assert top.returncode == 0 and "generate" in top.stdout and "prune" in top.stdout
    for cmd in ("generate", "prune", "recover", "evaluate", "run"):
        r = dadpo(cmd, "--help")
        assert r.returncode == 0 and "usage: dadpo " + cmd in r.stdout, cmd


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--model", "no-such-model"], "no-such-model"),
        (["--model", "missing/dir/model"], "missing/dir/model"),
        (["--model", "nothere.gguf"], "nothere.gguf"),
        (["--prompts", "{tmp}/missing.jsonl"], "missing.jsonl"),
        (["--prompts", "{tmp}/empty.jsonl"], "empty"),
        (["--prompts", "{tmp}/weird.jsonl"], "unknown dataset format"),
        (["--prompts", "{tmp}/ok.jsonl", "--format", "nope"], "nope"),
        (["--prompts", "{tmp}/ok.jsonl", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--prompts", "{tmp}/ok.jsonl", "--batch-size", "x"], "--batch-size"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, named):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "weird.jsonl").write_text('{"q": 1}\n')
    (tmp_path / "ok.jsonl").write_text('{"prompt": "hi"}\n')
    out = tmp_path / "out.jsonl"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--prompts" not in args:
        args += ["--prompts", str(tmp_path / "ok.jsonl")]
    r = dadpo("generate", *args, "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert named in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() and not (tmp_path / "out.jsonl.part").exists()


def test_generate_vicuna_prompts_to_jsonl(tmp_path, data_dir):
    out = tmp_path / "a.jsonl"
    r = dadpo("generate", "--prompts", str(data_dir / "vicuna_bench"), "--limit", "3", "--max-new-tokens", "16",
              "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["1", "2", "3"]
    assert all(row["response"] and row["model"].startswith("smollm2-135m-instruct@sha256:") for row in rows)
    assert "wrote 3 answers" in r.stdout
