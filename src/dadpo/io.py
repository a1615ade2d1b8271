"""Files in and out: crash-safe writing (nothing we write is ever visible half-written), JSONL and YAML
reading whose errors name the file's own line, and the checks made before writing (output paths) or
deleting (ownership) anything."""

from __future__ import annotations

import errno
import json
import math
import os
import stat
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
    return list(parse_jsonl(Path(path).read_text(encoding="utf-8"), drop_torn_tail=drop_torn_tail))


def parse_jsonl(text: str, *, drop_torn_tail: bool = False) -> Iterator[Any]:
    """The JSON value of each non-blank line of JSONL `text`.

    Lines end at "\n" only: JSON strings may hold U+2028 or U+0085 unescaped (we write them so, with
    `ensure_ascii=False`), and `str.splitlines` would cut a row there. A bad line raises
    `json.JSONDecodeError` with its line and column counted in the whole text, so messages name the file's
    line, not "line 1" of the row. With `drop_torn_tail`, a last line without its newline (cut short by a
    crash) is skipped instead."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        line = text[start:] if end < 0 else text[start:end]
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                if drop_torn_tail and end < 0:
                    return
                raise json.JSONDecodeError(e.msg, text, start + e.pos) from None
        if end < 0:
            return
        start = end + 1


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


def load_json_object(path: Path, what: str) -> dict:
    """The JSON object in file `path`; anything else (unreadable, not UTF-8, not JSON, not an object) is one
    DadpoError line that starts with `what` and names the file."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DadpoError(f"{what}: cannot read {path.name} ({reason})") from None
    if not isinstance(obj, dict):
        raise DadpoError(f"{what}: {path.name} must hold a JSON object, got {type(obj).__name__}")
    return obj


def check_removable(path: Path, what: str) -> None:
    """Refuse to delete `path` when it is a symbolic link, the current directory, a parent of it, the home folder
    or a filesystem root, whatever proof of ownership it holds."""
    if path.is_symlink():
        raise DadpoError(f"{what} {path} is a symbolic link; dadpo deletes only real folders it made")
    real, cwd = path.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents or real == Path.home().resolve() or real == Path(real.anchor):
        raise DadpoError(f"{what} {path} is the current directory, a parent of it, the home folder or a root; "
                         "dadpo never deletes those")


#: a run's hold on its output is this file beside the output (see `hold_output`)
LOCK_SUFFIX = ".dadpo-lock"
_LOCK_HEADER = "dadpo run: "


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of output `path`: `.NAME.dadpo-lock` beside it (beside, not inside, so that replacing or
    deleting the output folder never drops a hold), links and `..` resolved so every name of one output
    shares one lock."""
    path = Path(os.path.realpath(path))
    return path.parent / f".{path.name}{LOCK_SUFFIX}"


@contextmanager
def hold_output(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold output `path` (given as `what`, e.g. `--out`) for the block, so a second dadpo run writing there
    fails with one line naming the run that holds it instead of interleaving its writes with this one's.

    The hold is an exclusive `flock` on `lock_path(path)`. Folders made for it are removed again at the end
    if they are still empty (a run refused later, e.g. for a bad model, leaves nothing behind). The kernel
    lets go of the lock when the process ends, however it ends (kill -9 included), so a killed run leaves
    nothing to clear by hand and its rerun resumes. The file is removed when the block ends, by its holder
    only, once it has checked that the file is still the one it locked. A non-empty file of that name that
    dadpo did not write is refused and left alone (an empty one is a hold whose run was killed before writing
    its line). Where no lock file can be made or locked there (a read-only parent, a filesystem without
    `flock`), the run goes on without a hold and says so. Under N processes the main process holds it for
    all of them, and all of them fail when it cannot."""
    from dadpo.distributed import agree, is_main

    lock = lock_path(path)
    made: list[Path] = []  # folders the lock file needed, outermost first
    fd, error = None, None
    if is_main():
        made = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()][::-1]
        try:
            fd = _lock(lock, what, path)
        except DadpoError as e:
            error = str(e)
            _remove_empty(made)
    if (error := agree(error)) is not None:
        raise DadpoError(error)
    try:
        yield
    finally:
        if fd is not None:
            _unlock(lock, fd)
        _remove_empty(made)


def _remove_empty(made: list[Path]) -> None:
    """Remove the folders `hold_output` made (outermost first in `made`) that nothing has been put in."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:  # not empty (the run wrote its output), or gone
            return


def _lock(lock: Path, what: str, path) -> int | None:
    """An open descriptor holding `lock` exclusively, with this process's line written in it; None (and a
    warning) where the filesystem allows no such lock."""
    import fcntl
    import logging
    import socket

    def unheld(reason: OSError) -> None:
        logging.getLogger("dadpo").warning("%s %s: no hold on it (%s: %s); make sure no other dadpo run writes "
                                           "there", what, path, lock, reason.strerror or reason)

    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise DadpoError(f"{what} {path}: {lock} is a link, not a lock file dadpo made; move it away") \
                    from None
            return unheld(e)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise DadpoError(f"{what} {path}: {lock} is not a lock file dadpo made; move it away")
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            if holder and not holder.startswith(_LOCK_HEADER):
                raise DadpoError(f"{what} {path}: {lock} exists and dadpo did not write it; move it away")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                who = holder.removeprefix(_LOCK_HEADER) or "a process that is starting"
                raise DadpoError(f"{what} {path} is in use by another dadpo run ({who}); wait for it to end "
                                 f"or choose another {what}") from None
            except OSError as e:  # e.g. a network filesystem mounted without locks
                os.close(fd)
                return unheld(e)
            if not _same_file(fd, lock):  # its holder removed it after we opened it: lock the new one
                os.close(fd)
                continue
            line = f"{_LOCK_HEADER}pid {os.getpid()} on {socket.gethostname()}\n".encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, line, 0)
            return fd
        except BaseException:
            os.close(fd)
            raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _unlock(lock: Path, fd: int) -> None:
    """Remove the lock file while still holding it (a run that opened it since sees it gone and locks a new
    one), then let go."""
    try:
        if _same_file(fd, lock):
            lock.unlink()
    finally:
        os.close(fd)


def read_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of file `path`, given as `what` (e.g. `recipe`, `--config`, `dataset`); every way it can
    be unreadable (missing, a folder, no permission, not UTF-8) is one DadpoError line naming the file."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DadpoError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as e:
        raise DadpoError(f"cannot read {what} {path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                         f"{e.start})") from None
    except OSError as e:
        raise DadpoError(f"cannot read {what} {path}: {e.strerror or e}") from None


def read_yaml(path: str | os.PathLike, what: str) -> Any:
    """The parsed YAML file `path`, given as `what` (see `read_text`); invalid YAML is one DadpoError line
    naming the file and the line and column of the problem."""
    import yaml

    text = read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DadpoError(f"{what} {path}: invalid YAML{where}: {problem}") from None


def check_out_path(path: str | os.PathLike, what: str, *, folder: bool, replaced: bool = False) -> None:
    """Fail with one line naming `what` (e.g. `--out`) unless `path` can be written as a file or, with
    `folder`, as a folder: it is not the other kind of thing, nothing on the way to it is a file, an existing
    folder is writable, and so is the folder that will hold it (the nearest existing parent) when it does
    not exist yet or is `replaced` from beside it (atomic renames, part files). It only looks and creates
    nothing, so a command stopped here, before any model loads, leaves nothing behind."""
    path = Path(path)
    kind = _kind(path, what)
    if kind == "dir" and not folder:
        raise DadpoError(f"{what} {path} is a directory; give a file")
    if kind == "other" and folder:
        raise DadpoError(f"{what} {path} exists and is not a directory")
    if kind == "dir" and not os.access(path, os.W_OK | os.X_OK):
        raise DadpoError(f"{what} {path} is not writable (read-only or permission denied)")
    if kind is not None and not replaced:
        return
    for parent in path.parents:
        parent_kind = _kind(parent, what)
        if parent_kind == "other":
            raise DadpoError(f"{what} {path}: {parent} exists and is not a directory")
        if parent_kind == "dir":
            if not os.access(parent, os.W_OK | os.X_OK):
                raise DadpoError(f"{what} {path}: cannot write in {parent} (read-only or permission denied)")
            return


def _kind(path: Path, what: str) -> str | None:
    """What is at `path`, links followed: "dir", "other" (a file or anything else) or None (nothing)."""
    try:
        return "dir" if stat.S_ISDIR(path.stat().st_mode) else "other"
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:  # e.g. a name too long, a loop of links, a folder we may not look into
        raise DadpoError(f"{what} {path}: {e.strerror or e}") from None
