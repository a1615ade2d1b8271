"""Atomic writes: the old file survives a failed write, no temp file is left, results are world-readable."""

from __future__ import annotations

import os

import pytest

from dadpo.io import atomic_write_json, atomic_write_text


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
