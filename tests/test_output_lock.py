"""A run holds its output while it runs: a second dadpo run on the same output stops with one line naming the
holder, before any model loads, and leaves everything as it was; a killed holder leaves no hold behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dadpo.cli import main
from dadpo.errors import DadpoError
from dadpo.io import hold_output, lock_path
from test_ownership import COMMANDS, one_line_error, snapshot, user_file


def test_a_second_hold_is_refused_with_the_holders_pid_and_the_lock_goes_with_the_first(tmp_path):
    out = tmp_path / "run"
    with hold_output(out, "output_dir"):
        assert lock_path(out) == tmp_path / ".run.dadpo-lock"
        assert f"pid {os.getpid()} on " in lock_path(out).read_text()
        held = rf"output_dir {out} is in use by another dadpo run \(pid {os.getpid()} on "
        with pytest.raises(DadpoError, match=held), hold_output(out, "output_dir"):
            pass
    assert list(tmp_path.iterdir()) == []  # nothing left beside the output, and no output made
    with hold_output(out, "output_dir"):
        pass


def test_a_killed_holder_leaves_no_hold(tmp_path):
    """SIGKILL gives a run no chance to clean up: its lock file stays, but the kernel has let go of the lock,
    so the next run takes it (and removes the file when it ends)."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time\nfrom dadpo.io import hold_output\nwith hold_output({str(out)!r}, "
                               "'--out'):\n    print('held', flush=True)\n    time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(DadpoError, match=rf"in use by another dadpo run \(pid {holder.pid} on "), \
                hold_output(out, "--out"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert f"pid {holder.pid} " in lock_path(out).read_text()  # stale file, no lock
    with hold_output(out, "--out"):
        assert f"pid {os.getpid()} " in lock_path(out).read_text()
    assert not lock_path(out).exists()


def test_a_file_at_the_lock_path_that_dadpo_did_not_write_is_refused_untouched(tmp_path):
    out = tmp_path / "run"
    user_file(lock_path(out), "my notes")
    with pytest.raises(DadpoError, match="exists and dadpo did not write it"), hold_output(out, "--out"):
        pass
    assert lock_path(out).read_text() == "my notes"


def test_a_new_nested_output_is_held_and_every_name_of_an_output_shares_its_hold(tmp_path):
    out = tmp_path / "runs" / "new" / "run"  # none of it exists yet: a fresh clone's runs/…
    with hold_output(out, "output_dir"):
        assert lock_path(out).is_file() and not out.exists()
        (tmp_path / "link").symlink_to(tmp_path / "runs")
        for other in (tmp_path / "link" / "new" / "run", tmp_path / "runs" / "x" / ".." / "new" / "run"):
            with pytest.raises(DadpoError, match="in use by another dadpo run"), hold_output(other, "--out"):
                pass
    # nothing was written under the hold (e.g. a run refused for a bad model): the folders made for it go
    assert not (tmp_path / "runs").exists()
    with hold_output(out, "output_dir"):
        out.mkdir()  # the run's output: the folders made for the hold stay with it
    assert out.is_dir() and not lock_path(out).exists()


def test_on_a_filesystem_without_locks_the_run_goes_on_and_says_so(tmp_path, caplog, monkeypatch):
    """e.g. NFS mounted without locking: flock fails with ENOLCK (injected here), and refusing every run there
    would be worse than running without a hold."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with hold_output(tmp_path / "run", "--out"):
        pass
    assert "no hold on it" in caplog.text and "No locks available" in caplog.text


def _recover(out: Path, model: Path, prompts: Path) -> list[str]:
    return ["recover", "--student", str(model), "--teacher", str(model), "--prompts", str(prompts), "--out",
            str(out), "--method", "dsft"]


def _evaluate(out: Path, model: Path, prompts: Path) -> list[str]:
    return ["evaluate", "--students", str(model), "--teacher", str(model), "--out", str(out)]


def _prune(out: Path, model: Path, prompts: Path) -> list[str]:
    return ["prune", "--model", str(model), "--out", str(out), "--ppl-max-windows", "0"]


def _generate(out: Path, model: Path, prompts: Path) -> list[str]:
    return ["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out)]


STAGE_COMMANDS = {"recover": _recover, "evaluate": _evaluate, "prune": _prune, "generate": _generate}


@pytest.mark.parametrize("command", [*COMMANDS, *STAGE_COMMANDS])
def test_every_writing_command_refuses_an_output_another_run_holds(command, tmp_path, capsys, data_dir,
                                                                   smollm_dir, no_model):
    """Each command that writes an output stops with one line, exit 2, before loading a model, when another
    run holds that output; the other run's files are left as they were."""
    prompts = user_file(tmp_path / "p.jsonl", "".join(f'{{"prompt": "q{i}"}}\n' for i in range(4)))
    out = tmp_path / ("answers.jsonl" if command == "generate" else "run")
    argv = (COMMANDS[command][0](out, data_dir) if command in COMMANDS
            else STAGE_COMMANDS[command](out, smollm_dir, prompts))
    with hold_output(out, "--out"):
        before = snapshot(tmp_path)
        err = one_line_error(capsys, main(argv))
        assert snapshot(tmp_path) == before
    assert f"{out} is in use by another dadpo run (pid {os.getpid()} on " in err
