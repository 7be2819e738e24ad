"""Every file the project writes goes through here: atomically, so that nothing is ever half-written.

    with atomic_path(path) as tmp: write tmp   ->   tmp fsynced, renamed over path, folder fsynced

A reader (or a crash at any moment, SIGKILL included) sees either the old file or the whole new one.
The temporary file sits beside the target (the same file system, so the rename is atomic) and is
named `.<name>.<random>.tmp<suffix>`; it is removed when writing fails (emptied first, so that its
space comes back even while a writer still holds it open), and :func:`remove_stale_temporaries`
removes those a killed process left behind.

A write the file system refuses is an OSError naming the target, never the temporary file: a full
disk (ENOSPC, also where the writer says so in its own words: numpy's short write, torch's
RuntimeError), a quota, a read-only file system; a target that is a folder, or whose folder does
not exist, is refused before anything is written.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

TEMPORARY_MARK = ".tmp"
# What a write refused by the file system raises, without naming a file (a write(2), an fsync).
WRITE_REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def check_target(path: os.PathLike) -> Path:
    """`path` as a Path, if a file can be written there: IsADirectoryError when it is a folder,
    FileNotFoundError when its folder does not exist (each naming `path`). What :func:`atomic_path`
    checks first; a command that computes before it writes (predict --csv) checks it up front."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"its folder {path.parent} does not exist", str(path))
    return path


@contextmanager
def atomic_path(path: os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` to write; on success it replaces `path` (fsync, rename, fsync
    of the folder). `suffix` ends the temporary name, for writers that choose a format by it
    (matplotlib's savefig, numpy's save). A refused write raises OSError naming `path` (module docstring)."""
    path = check_target(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TEMPORARY_MARK}{suffix}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except (OSError, RuntimeError) as exc:  # what writers raise when the file system refuses them
        refused = _refused(exc, path, tmp)
        if refused is None:
            raise
        raise refused from exc
    finally:
        _discard(tmp)


def _refused(exc: Exception, path: Path, tmp: Path) -> Optional[OSError]:
    """The OSError naming `path` that a failed write of `tmp` stands for, or None (`exc` is not
    about this file): an OSError on `tmp`, or without a file name and with an errno of WRITE_REFUSED;
    else, unless it is an OSError naming another file, ENOSPC when `path`'s file system is full."""
    if isinstance(exc, OSError) and exc.filename is not None:
        named = os.fsdecode(exc.filename) == str(tmp)
        return OSError(exc.errno, exc.strerror, str(path)) if named and exc.errno is not None else None
    if isinstance(exc, OSError) and exc.errno in WRITE_REFUSED:
        return OSError(exc.errno, exc.strerror, str(path))
    if _full(path.parent):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


def _full(folder: Path) -> bool:
    """Whether the file system of `folder` has no block left for this process (root may use the
    blocks reserved for it)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) == 0


def _discard(tmp: Path) -> None:
    """Remove a temporary file that did not become its target (emptied first: a writer that still
    holds it open, as torch's does until its error is dropped, would keep its blocks)."""
    try:
        os.truncate(tmp, 0)
        tmp.unlink()
    except FileNotFoundError:
        pass  # renamed into place, or never created


def write_bytes(path: os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _to_json(value: Any) -> Any:
    """What json cannot write as it is: numpy scalars and arrays (and tensors) as Python values
    (their `tolist`), paths as text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: os.PathLike, obj: Any) -> None:
    """JSON with an indent of 2, written atomically; numpy values and paths converted (`_to_json`)."""
    write_text(path, json.dumps(obj, indent=2, default=_to_json) + "\n")


def remove_stale_temporaries(folder: os.PathLike) -> list[Path]:
    """Remove the temporary files of interrupted atomic writes in `folder` (not below it); return them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and TEMPORARY_MARK in p.name and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_directory(folder: Path) -> None:
    """Make the rename itself durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
