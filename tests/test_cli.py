"""The `dadpo` command line as a user runs it: real subprocesses, exit codes, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import free_port


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


@pytest.mark.slow
def test_generate_with_two_processes_writes_what_one_process_writes(tmp_path, smollm_dir):
    """torchrun starts two processes (each says so), each answers its share, the first writes the file: the
    rows equal one process's, sampled or greedy; a run killed with two processes' part files left resumes."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": f"Name a fruit, then the number {i}."}) + "\n"
                               for i in range(9)))
    common = ["generate", "--model", str(smollm_dir), "--prompts", str(prompts), "--max-new-tokens", "8",
              "--batch-size", "2"]

    def torchrun(*args):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "dadpo",
                               *args], capture_output=True, text=True, timeout=600)

    for decoding in (["--temperature", "1", "--top-p", "0.9", "--seed", "5"], []):
        one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
        r = dadpo(*common, *decoding, "--out", str(one), "--overwrite")
        assert r.returncode == 0, r.stderr
        r = torchrun(*common, *decoding, "--out", str(two), "--overwrite")
        assert r.returncode == 0, r.stderr
        assert "rank 0 of 2" in r.stderr and "rank 1 of 2" in r.stderr  # really two processes
        assert r.stdout.count("wrote 9 answers") == 1  # reported once, by the first process
        assert two.read_text() == one.read_text()
        assert sorted(p.name for p in tmp_path.glob("two.jsonl*")) == ["two.jsonl"]
    # a two-process run killed after rank 1 answered three prompts: the rerun keeps them and completes
    rows = one.read_text().splitlines(keepends=True)
    resumed = tmp_path / "resumed.jsonl"
    (tmp_path / "resumed.jsonl.part.1").write_text("".join(rows[1:7:2]))
    r = torchrun(*common, "--out", str(resumed))
    assert r.returncode == 0, r.stderr
    assert resumed.read_text() == one.read_text() and not list(tmp_path.glob("resumed.jsonl.part*"))
