"""A run folder belongs to one run: a lock while a process writes it, run.json, and the run id in its files.

    with open_run(folder, config, mode) as run:   # mode: "new", "overwrite" or "resume"
        train ...                                   # run.finish() when the test report is written

The contract:

- **Lock.** A process writes a run folder only while it holds `<folder>/.lock` (`fcntl.flock`,
  exclusive, not waiting); the holder writes its pid and host into it. A second process gets one
  line naming them. The lock file stays when released: removing it would let a later process lock
  a new file while an earlier one still holds the old one. It is written in place, not through
  :mod:`vkd_pyro.files` (an atomic rename would give the next process another file to lock).
- **One run.** `new` refuses a folder that holds any entry besides `.lock`, `.replaced-*` folders
  and the temporaries of interrupted atomic writes; `overwrite` first *moves* those entries into
  `<folder>/.replaced-<UTC time>/` (nothing is deleted); `resume` continues the run that run.json
  names. The temporaries an interrupted atomic write left behind are removed at every start
  (:func:`vkd_pyro.files.remove_stale_temporaries`).
- **run.json**: `{"run_id", "status", "reason", "started", "updated", "ended", "pid", "host",
  "resumed"}`; status `running`, then `finished`, `interrupted` (SIGINT/SIGTERM), or `failed` with
  the reason (the error's one line; for a write the file system refused, the file and why). A
  finished run stays finished, whatever stops the process after. Where run.json itself cannot be
  written (a full disk), the error gets a note saying so (:func:`add_note`). `run_id` is a uuid4 hex,
  kept when the run is resumed.
- **A refused resume changes nothing.** `resume` checks the folder (`check`, under the lock) before
  run.json says `running`: a refusal there writes nothing, and a run with nothing left to do is left
  as it is. A resume that fails before its first training step (`RunFolder.training` still False)
  puts run.json, config.yaml and history.csv back byte for byte instead of marking the run failed
  (run.log keeps the lines it logged; nothing else is written before the first step).
- **The run id in the files.** checkpoint.pt and last.pt carry `run_id` (`vkd_pyro.training.checkpoint.
  save_atomic` stamps every checkpoint written into a folder that this process has open), and so does
  metrics.json (training and `evaluate`).
- **Reading a run** (:func:`check_loadable`, used by `vkd_pyro.analysis.runs.load_run` for `evaluate`,
  `predict`, `diagnose`, `figures`): checkpoint.pt must carry the run id of run.json, whose config.yaml
  sits beside it; a folder without run.json (written before run ids) is read when its checkpoint
  has no run id either. Whatever the status, checkpoint.pt is only ever the whole best-validation
  checkpoint of that run (written atomically at the end of an epoch), so an interrupted or failed
  run is read (its best epoch so far); a run that another process is training now (its lock held)
  is refused, since that process replaces checkpoint.pt and metrics.json while it runs.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from vkd_pyro.config import Config
from vkd_pyro.errors import Interrupted, TrainingDiverged, UserError
from vkd_pyro.files import TEMPORARY_MARK, remove_stale_temporaries, write_bytes, write_json
from vkd_pyro.training.distributed import say

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
REPLACED_PREFIX = ".replaced-"
# What a sweep's launcher (vkd_pyro.analysis.launch) writes beside a run: the job's record, not the run's.
LAUNCH_FILES = ("launch.log", "launch.json")
MODES = ("new", "overwrite", "resume")
# What a resume writes before its first training step (put back when it fails there).
KEPT_ON_RESUME = (RUN_FILE, "config.yaml", "history.csv")

_OPEN: dict[Path, str] = {}  # resolved folder -> run id, for the folders this process has open


def config_hash(config: Config, length: int = 8) -> str:
    """The first `length` hex digits of the SHA-256 of the resolved config (canonical JSON, sorted keys)."""
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def safe_name(text: str) -> str:
    """`text` as a part of a file name: runs of anything but letters, digits and ._+- become one _
    (an objective's import path has a colon), leading and trailing _ dropped ("_" when nothing is left)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "_"


def default_run_folder(config_path: os.PathLike, config: Config) -> Path:
    """runs/<config name>-<objective>-seed<seed>-<config_hash>: two configs, two folders."""
    name = f"{Path(config_path).stem}-{safe_name(config.inference.objective)}-seed{config.seed}-{config_hash(config)}"
    return Path("runs") / name


def open_run_id(folder: os.PathLike) -> Optional[str]:
    """The id of the run this process has open in `folder` (None when it has none open there)."""
    return _OPEN.get(Path(folder).resolve())


def run_entries(folder: Path) -> list[str]:
    """The names in `folder` that belong to a run: all but the lock, `.replaced-*`, temporaries and
    the launcher's job record (LAUNCH_FILES)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.name != LOCK_FILE and not p.name.startswith(REPLACED_PREFIX) and p.name not in LAUNCH_FILES
                  and not (p.name.startswith(".") and TEMPORARY_MARK in p.name))


def read_record(folder: Path) -> Optional[dict]:
    """run.json of `folder` (None when there is none); a damaged one is a one-line UserError."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable run record ({type(exc).__name__})") from None
    if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
        raise UserError(f"{path}: not a run record (no run_id)")
    return record


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _os_error(path: Path, exc: OSError, what: str) -> UserError:
    return UserError(f"{path}: {what} ({exc.strerror or type(exc).__name__})")


@contextmanager
def folder_lock(folder: os.PathLike, create: bool = True) -> Iterator[None]:
    """Hold `<folder>/.lock` (exclusive, not waiting) for the block; UserError naming the holder's
    pid and host when another process holds it, or naming the folder when it cannot be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: is a file, not a run folder (give --out a folder)")
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_error(folder, exc, "cannot create the run folder") from None
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _os_error(folder, exc, "cannot write in the run folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _os_error(path, exc, "cannot lock the run folder") from None
            raise UserError(f"{folder}: another process is writing this run folder ({_holder(path)}); "
                            "wait for it to end, or use another --out") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {_now()}\n".encode(), 0)
        except OSError as exc:
            raise _os_error(path, exc, "cannot write the lock file") from None
        _probe(folder)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _probe(folder: Path) -> None:
    """UserError naming `folder` unless a file can be created in it (what every atomic write does);
    os.access would not do: it says yes to root even where the folder is read-only or immutable."""
    probe = folder / f".probe.{uuid.uuid4().hex}{TEMPORARY_MARK}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise _os_error(folder, exc, "cannot write in the run folder") from None


def _holder(lock_path: Path) -> str:
    """What the lock file says about its holder (the holder writes it just after locking: wait a moment)."""
    for _ in range(20):
        try:
            text = lock_path.read_text().strip()
        except OSError:
            text = ""
        if text:
            return text
        time.sleep(0.05)
    return "pid and host not yet written"


def lock_held(folder: os.PathLike) -> Optional[str]:
    """The holder of `<folder>/.lock` when another process holds it now, else None (it is not taken)."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _holder(path)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def move_aside(folder: Path, entries: list[str]) -> Path:
    """Move `entries` of `folder` into a new `<folder>/.replaced-<UTC time>/`; return it."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = folder / f"{REPLACED_PREFIX}{stamp}"
    k = 1
    while target.exists():
        k += 1
        target = folder / f"{REPLACED_PREFIX}{stamp}-{k}"
    target.mkdir()
    for name in entries:
        shutil.move(str(folder / name), str(target / name))
    return target


class RunFolder:
    """A run folder this process holds the lock of (see the module docstring); `record` is run.json."""

    def __init__(self, folder: Path, record: dict):
        self.folder, self.record = folder, record
        self.training = False  # set by the trainer before its first step: from then on a failure is the run's
        self.nothing_to_do: Optional[str] = None  # the `check` of open_run found the run finished: this line

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    def _write(self, status: str, reason: Optional[str] = None) -> None:
        record = {**self.record, "status": status, "reason": reason, "updated": _now(),
                  "ended": _now() if status != "running" else None}
        write_json(self.folder / RUN_FILE, record)
        self.record = record  # what run.json says

    def finish(self) -> None:
        self._write("finished")


def _claim(folder: Path, mode: str) -> dict:
    """The run record a new, overwriting or resuming run starts with (the lock is held)."""
    entries = run_entries(folder)
    previous = read_record(folder)
    host = {"pid": os.getpid(), "host": socket.gethostname()}
    if mode == "resume":
        if previous is None:  # a folder written before run ids: it becomes a run now
            return {"run_id": uuid.uuid4().hex, "started": _now(), "resumed": 1, "legacy": True, **host}
        return {**previous, **host, "resumed": int(previous.get("resumed", 0)) + 1}
    if entries and mode == "new":
        what = f"run {previous['run_id']} ({previous.get('status')})" if previous else "files of another run"
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise UserError(f"{folder}: holds {what}: {shown}; continue it with --resume {folder}, move its files "
                        f"into {folder}/{REPLACED_PREFIX}<time>/ with --overwrite, or choose another --out")
    if entries:
        target = move_aside(folder, entries)
        say(f"--overwrite: moved the {len(entries)} files of the previous "
            + (f"run {previous['run_id']} " if previous else "run ") + f"into {target} (delete it when not needed)")
    return {"run_id": uuid.uuid4().hex, "started": _now(), "resumed": 0, **host}


def _keep(folder: Path) -> dict:
    """name -> bytes (None when absent) of the files a resume writes before its first step."""
    return {name: (folder / name).read_bytes() if (folder / name).is_file() else None for name in KEPT_ON_RESUME}


def _put_back(folder: Path, kept: dict) -> None:
    """The files of `_keep` as they were (atomically; a file that was absent is removed)."""
    for name, data in kept.items():
        path = folder / name
        if data is None:
            path.unlink(missing_ok=True)
        elif not path.is_file() or path.read_bytes() != data:
            write_bytes(path, data)


@contextmanager
def open_run(folder: os.PathLike, mode: str = "new", check: Optional[Callable[[], Optional[str]]] = None
             ) -> Iterator[RunFolder]:
    """Hold the folder's lock, start (or resume) its run in run.json, stamp its id into the files
    written meanwhile, and record how the block ended: `finish()` marks it finished; Interrupted
    -> interrupted; any other exception -> failed, with its first line as the reason.

    `check` (resume) runs under the lock before anything is written: an exception leaves the folder
    as it was; a line returned says there is nothing to do (`run.nothing_to_do`): the block gets the
    run and nothing is written, however it ends. A resume that fails before `run.training` is set
    puts back run.json, config.yaml and history.csv as they were, byte for byte (module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode: one of {MODES}, got {mode!r}")
    folder = Path(folder)
    if mode == "resume" and not folder.is_dir():
        raise UserError(f"{folder}: run folder not found (--resume takes a folder written by `vkd-pyro train`)")
    with folder_lock(folder):
        stale = remove_stale_temporaries(folder)
        if stale:
            say(f"removed {len(stale)} temporary files of interrupted writes from {folder}")
        run = RunFolder(folder, _claim(folder, mode))
        run.nothing_to_do = check() if check is not None else None
        if run.nothing_to_do is not None:
            yield run
            return
        kept = _keep(folder) if mode == "resume" else None
        run._write("running")
        key = folder.resolve()
        _OPEN[key] = run.run_id
        try:
            yield run
        except BaseException as exc:
            try:
                _record_end(run, exc, kept)
            except OSError as lost:  # a full disk may refuse run.json too: the error line says so
                add_note(exc, f"{lost.filename or folder / RUN_FILE}: could not be written either "
                          f"({lost.strerror or type(lost).__name__}); it still says {run.record['status']}")
            raise
        else:
            if run.record["status"] == "running":  # left without finish(): a rank > 0 or an early return
                run._write("interrupted", "ended before the test report")
        finally:
            _OPEN.pop(key, None)


def _record_end(run: RunFolder, exc: BaseException, kept: Optional[dict]) -> None:
    """How the block of `open_run` ended, in run.json (see open_run); a finished run stays finished."""
    if kept is not None and not run.training:  # refused before its first step: the run is as it was
        _put_back(run.folder, kept)
    elif run.record["status"] == "finished":  # its files are whole: what came after changes nothing
        return
    elif isinstance(exc, Interrupted):
        run._write("interrupted", str(exc))
    elif isinstance(exc, KeyboardInterrupt):
        run._write("interrupted", "KeyboardInterrupt")
    else:
        run._write("failed", reason(exc))


def reason(exc: BaseException) -> str:
    """An error as run.json's reason: its kind and first line (an OSError: the file and what the
    file system said)."""
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or 'not written'}"
    else:
        text = (str(exc).splitlines() or [""])[0]
    return f"{'diverged' if isinstance(exc, TrainingDiverged) else type(exc).__name__}: {text}"


def add_note(exc: BaseException, line: str) -> None:
    """Add `line` to the notes of `exc` (Python 3.11's `add_note`, kept by hand for 3.10): the
    command line prints them after its one-line message, separated by '; '."""
    exc.__notes__ = [*getattr(exc, "__notes__", []), line]


def check_loadable(folder: Path, checkpoint: dict) -> Optional[dict]:
    """UserError (one line) unless `checkpoint` (checkpoint.pt of `folder`) and config.yaml belong to
    the same run, and no other process is training it now (module docstring); returns run.json."""
    record = read_record(folder)
    found = checkpoint.get("run_id")
    if record is None:
        if found is not None:
            raise UserError(f"{folder}: checkpoint.pt is from run {found} but the folder has no {RUN_FILE}; "
                            "its config.yaml cannot be matched to the weights")
        return None
    holder = lock_held(folder)
    if record.get("status") == "running" and holder:
        raise UserError(f"{folder}: run {record['run_id']} is being trained now ({holder}); "
                        "evaluate it when it has finished")
    if found != record["run_id"] and not (found is None and record.get("legacy")):
        raise UserError(f"{folder}: checkpoint.pt is from run {found or '(no run id)'} but config.yaml and "
                        f"{RUN_FILE} are run {record['run_id']}'s; the weights do not belong to this config "
                        "(train the run again into a fresh folder)")
    return record


def stamp_metrics(folder: Path, run_id: str, name: str = "metrics.json") -> None:
    """Add the run id to a metrics file that training wrote (replaced atomically)."""
    path = Path(folder) / name
    metrics = json.loads(path.read_text())
    metrics["run_id"] = run_id
    write_json(path, metrics)


def check_writable(path: os.PathLike, key: str) -> None:
    """ConfigError-style one line naming `key` and `path` unless `path` is (or can be made) a writable folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{key}: {path}: cannot create the folder ({exc.strerror or type(exc).__name__})") from None
    if not path.is_dir():
        raise UserError(f"{key}: {path}: is a file, not a folder")
    try:
        _probe(path)
    except UserError:
        raise UserError(f"{key}: {path}: the folder is not writable") from None


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists and other values are leaves)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_differences(recorded: dict, wanted: dict) -> list[str]:
    """`key: <recorded> there, <wanted> now` for each dotted key whose values differ, in key order."""
    a, b = flatten(recorded), flatten(wanted)
    return [f"{key}: {a.get(key, '(absent)')} there, {b.get(key, '(absent)')} now"
            for key in sorted(set(a) | set(b)) if a.get(key, KeyError) != b.get(key, KeyError)]
