"""Atomic writes: the old file survives a failed write, no temp file is left, results are world-readable."""

from __future__ import annotations

import os

import pytest

from dadpo.io import atomic_path, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n' and (path.stat().st_mode & 0o777) == 0o644
    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "half")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # the temp file is gone


def test_atomic_path_keeps_the_suffix_and_cleans_up_after_a_failed_block(tmp_path):
    path = tmp_path / "plot.png"
    with atomic_path(path, ".png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp != path
        tmp.write_bytes(b"first")
    assert path.read_bytes() == b"first" and (path.stat().st_mode & 0o777) == 0o644
    with pytest.raises(RuntimeError, match="savefig failed"), atomic_path(path, ".png") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("savefig failed")
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_json_files_are_strict_json(tmp_path):
    import json

    atomic_write_json(tmp_path / "r.json", {"rate": float("nan"), "ci": (float("-inf"), 1.5), "n": 0})

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=no_constants) == {
        "rate": None, "ci": [None, 1.5], "n": 0}
