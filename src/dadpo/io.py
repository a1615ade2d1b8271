"""Crash-safe file writing: nothing we write is ever visible half-written."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dadpo.errors import DadpoError


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temp file beside `path` for the block to write (`suffix` keeps e.g. savefig's format right); renamed
    over `path` when the block succeeds, removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temp file beside `path`, fsync it, then rename it over `path`."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _strict(obj: Any) -> Any:
    """JSON has no NaN or Infinity (e.g. rates over zero valid pairs): write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON that any parser reads, written atomically."""
    atomic_write_text(path, json.dumps(_strict(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append rows in a single write + fsync, so a kill leaves at most one torn last line."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike, *, drop_torn_tail: bool = False) -> list[dict]:
    """Read a JSONL file. With `drop_torn_tail`, a last line cut short by a crash is ignored."""
    return list(_iter_jsonl(Path(path), drop_torn_tail))


def _iter_jsonl(path: Path, drop_torn_tail: bool) -> Iterator[dict]:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if drop_torn_tail and i == len(lines) - 1 and not line.endswith("\n"):
                return
            raise


def truncate_torn_tail(path: str | os.PathLike) -> None:
    """Cut a trailing line without its newline (a crash mid-append) so appends start clean."""
    path = Path(path)
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)


def read_json_object(path: Path) -> dict | None:
    """The JSON object in file `path`, or None when there is none (missing, not a file, not a JSON object):
    how dadpo reads the records that prove it made a folder."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def check_removable(path: Path, what: str) -> None:
    """Refuse to delete `path` when it is a symbolic link, the current directory, a parent of it, the home folder
    or a filesystem root, whatever proof of ownership it holds."""
    if path.is_symlink():
        raise DadpoError(f"{what} {path} is a symbolic link; dadpo deletes only real folders it made")
    real, cwd = path.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents or real == Path.home().resolve() or real == Path(real.anchor):
        raise DadpoError(f"{what} {path} is the current directory, a parent of it, the home folder or a root; "
                         "dadpo never deletes those")
