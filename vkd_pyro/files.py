"""Every file the project writes goes through here: atomically, so that nothing is ever half-written.

    with atomic_path(path) as tmp: write tmp   ->   tmp fsynced, renamed over path, folder fsynced

A reader (or a crash at any moment, SIGKILL included) sees either the old file or the whole new one.
The temporary file sits beside the target (the same file system, so the rename is atomic) and is
named `.<name>.<random>.tmp<suffix>`; it is removed when writing fails, and
:func:`remove_stale_temporaries` removes those a killed process left behind.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TEMPORARY_MARK = ".tmp"


@contextmanager
def atomic_path(path: os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` to write; on success it replaces `path` (fsync, rename, fsync
    of the folder). `suffix` ends the temporary name, for writers that choose a format by it
    (matplotlib's savefig, numpy's save)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TEMPORARY_MARK}{suffix}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


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
