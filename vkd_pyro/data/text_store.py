"""Frozen report token states on disk, read one record at a time (positional reads, no full load).

One store folder per (encoder identity, max_tokens), `<cache_dir>/text/<sha256(identity, max_tokens)[:24]>/`:

- `meta.json`: format, encoder identity, max_tokens, width W (written once, atomically);
- `states.f16`: every record's token states, one after another, as rows of W float16 values;
- `index.npy`: one entry per record (key, offset, length): the record's states are rows
  offset .. offset + length of `states.f16`. key = sha256(identity, max_tokens, text) (`entry_key`).

Writing appends chunks: the chunk's rows go to the end of `states.f16` (fsync'd), then a new index
that includes them replaces the old one (atomically: `vkd_pyro.files.write_bytes`). An interrupted write
therefore keeps every committed chunk; the rows it left past the committed end are cut off by the
next writer, which encodes only the texts that are still missing. A chunk the file system refuses
(a full disk) is cut off at once and raises an OSError naming the file: the store is left as it was
before the chunk, every file whole. A store whose index cannot be
read or disagrees with its array (offsets not contiguous, array shorter than the index says) is
rebuilt from scratch with a warning naming the bad file (the image caches' `CorruptCacheWarning`).
Writers hold an exclusive lock on `lock` (fcntl), so two processes filling the same store do not
interleave.

Reading never loads the array: `TextFeatureStore.view(rows)` is a `TokenStates`, a small object
(the array's path, the offset and length of each of its records) that opens its own read-only file
descriptor on first use in each process (DataLoader workers, DDP ranks) and reads only the rows of
the record asked for. Its memory is the index (44 bytes a record) and the view (12 bytes a record);
the array's pages live in the page cache, shared by every process reading the store.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from vkd_pyro.data.image_cache import CorruptCacheWarning
from vkd_pyro.errors import UserError
from vkd_pyro.files import write_bytes

STORE_FORMAT = 1
INDEX_DTYPE = np.dtype([("key", "S32"), ("offset", "<i8"), ("length", "<i4")])
ARRAY_FILE, INDEX_FILE, META_FILE, LOCK_FILE = "states.f16", "index.npy", "meta.json", "lock"
DEFAULT_CHUNK = 2048


def entry_key(identity: str, max_tokens: int, text: str) -> str:
    """sha256 hex of (encoder identity, max_tokens, text): the key of one record of a store."""
    return hashlib.sha256(f"{identity}\0{int(max_tokens)}\0{text}".encode("utf-8")).hexdigest()


def store_folder(cache_dir: str | os.PathLike, identity: str, max_tokens: int) -> Path:
    """The folder of the store of one (encoder identity, max_tokens) pair under `cache_dir`."""
    digest = hashlib.sha256(f"{identity}\0{int(max_tokens)}".encode("utf-8")).hexdigest()[:24]
    return Path(cache_dir) / "text" / digest


@dataclass(frozen=True)
class EncodingReport:
    """What one `get_or_compute` encoded: reports, their tokens, seconds and the device."""

    reports: int
    tokens: int
    seconds: float
    device: str

    def __str__(self) -> str:
        s = max(self.seconds, 1e-9)
        return (f"encoded {self.reports} reports ({self.tokens} tokens) on {self.device} in {self.seconds:.1f} s: "
                f"{self.reports / s:.1f} reports/s, {self.tokens / s:.0f} tokens/s")


class _Corrupt(Exception):
    """The store's files disagree; the message names the bad file."""


def _index_bytes(index: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(index, dtype=INDEX_DTYPE), allow_pickle=False)
    return buffer.getvalue()


class TextFeatureStore:
    """The store in `folder` of token states of width `width` (see the module docstring).

    `identity` and `max_tokens` name the encoder and truncation the states come from; they are kept
    in meta.json and a folder written for other values (or another format) is rebuilt. Opening a
    store reads its index only. Not thread-safe for writing from several threads of one process.
    """

    def __init__(self, folder: str | os.PathLike, identity: str, max_tokens: int, width: int):
        self.folder = Path(folder)
        self.meta = {"format": STORE_FORMAT, "identity": str(identity), "max_tokens": int(max_tokens),
                     "width": int(width), "dtype": "float16"}
        if int(width) < 1:
            raise UserError(f"text store {self.folder}: width must be positive, got {width}")
        self.width = int(width)
        self.index = np.zeros(0, dtype=INDEX_DTYPE)
        self._sorted: Optional[tuple[np.ndarray, np.ndarray]] = None
        if not self._load(reset=False):
            with self._locked():  # rebuilt under the writers' lock (it re-reads first)
                pass

    @classmethod
    def for_encoder(cls, cache_dir: str | os.PathLike, encoder, max_tokens: int) -> "TextFeatureStore":
        """The store of `encoder` (anything with `identity` and `hidden_size`) and `max_tokens` in `cache_dir`."""
        return cls(store_folder(cache_dir, encoder.identity, max_tokens), encoder.identity, max_tokens,
                   encoder.hidden_size)

    @property
    def array_path(self) -> Path:
        return self.folder / ARRAY_FILE

    @property
    def index_path(self) -> Path:
        return self.folder / INDEX_FILE

    @property
    def row_bytes(self) -> int:
        return 2 * self.width

    @property
    def committed_rows(self) -> int:
        """Token rows of `states.f16` that the index covers (rows past them are an unfinished chunk)."""
        if len(self.index) == 0:
            return 0
        return int(self.index["offset"][-1]) + int(self.index["length"][-1])

    def __len__(self) -> int:
        return len(self.index)

    # -- opening and checking --------------------------------------------------------------------

    def _read_checked(self) -> np.ndarray:
        """The committed index, checked against meta.json and the array; raises _Corrupt."""
        meta_path = self.folder / META_FILE
        if not meta_path.exists():
            if self.index_path.exists():
                raise _Corrupt(f"{meta_path} is missing")
            return np.zeros(0, dtype=INDEX_DTYPE)
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise _Corrupt(f"{meta_path} is unreadable ({type(exc).__name__})") from None
        if meta != self.meta:
            raise _Corrupt(f"{meta_path} belongs to another encoder, width or format")
        if not self.index_path.exists():
            return np.zeros(0, dtype=INDEX_DTYPE)
        try:
            index = np.load(self.index_path, allow_pickle=False)
        except Exception as exc:
            raise _Corrupt(f"{self.index_path} is unreadable ({type(exc).__name__})") from None
        if index.dtype != INDEX_DTYPE or index.ndim != 1:
            raise _Corrupt(f"{self.index_path} has dtype {index.dtype}, shape {index.shape}")
        lengths = index["length"].astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(index) else lengths
        if len(index) and (np.any(lengths < 1) or np.any(lengths > self.meta["max_tokens"])
                           or not np.array_equal(index["offset"], starts)):
            raise _Corrupt(f"{self.index_path} has offsets or lengths that do not follow one another")
        rows = int(lengths.sum())
        size = self.array_path.stat().st_size if self.array_path.exists() else 0
        if size < rows * self.row_bytes:
            raise _Corrupt(f"{self.array_path} holds {size} bytes but its index needs {rows * self.row_bytes} "
                           f"({len(index)} records, {rows} token rows of width {self.width})")
        return index

    def _load(self, reset: bool) -> bool:
        """Read the committed index; a corrupt store is emptied (with a warning) when `reset`,
        else left as it is and False returned."""
        self._sorted = None
        try:
            self.index = self._read_checked()
        except _Corrupt as bad:
            if not reset:
                return False
            warnings.warn(f"{bad}; rebuilding the text feature store {self.folder}", CorruptCacheWarning)
            self._reset()
        return True

    def _reset(self) -> None:
        """Remove the store's files (descriptors open on them stay valid) and start empty."""
        for name in (INDEX_FILE, ARRAY_FILE, META_FILE):
            path = self.folder / name
            if path.exists():
                path.unlink()
        self.index = np.zeros(0, dtype=INDEX_DTYPE)

    # -- looking records up ----------------------------------------------------------------------

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """The index entry (row of `index`) of each hex key, -1 where the store does not hold it."""
        if self._sorted is None:
            order = np.argsort(self.index["key"], kind="stable")
            self._sorted = (self.index["key"][order], order)
        sorted_keys, order = self._sorted
        wanted = np.array([bytes.fromhex(k) for k in keys], dtype="S32")
        if len(sorted_keys) == 0:
            return np.full(len(wanted), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(sorted_keys, wanted), len(sorted_keys) - 1)
        found = sorted_keys[at] == wanted
        return np.where(found, order[at], -1).astype(np.int64)

    def view(self, entries: Sequence[int] | np.ndarray) -> "TokenStates":
        """A TokenStates whose item i is the record at index entry entries[i] (all must exist)."""
        entries = np.asarray(entries, dtype=np.int64)
        if len(entries) and (entries.min() < 0 or entries.max() >= len(self.index)):
            raise ValueError("text feature store: view of records the store does not hold")
        return TokenStates(self.array_path, self.width, self.committed_rows,
                           self.index["offset"][entries].astype(np.int64),
                           self.index["length"][entries].astype(np.int32))

    # -- writing ---------------------------------------------------------------------------------

    @contextmanager
    def _locked(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK_FILE, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                self._load(reset=True)  # another process may have written (or broken) it meanwhile
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _append_locked(self, keys: Sequence[str], states: Sequence[np.ndarray | torch.Tensor]) -> None:
        if len(keys) != len(states):
            raise ValueError("text feature store: as many keys as states are needed")
        if not len(keys):
            return
        meta_path = self.folder / META_FILE
        if not meta_path.exists():
            write_bytes(meta_path, json.dumps(self.meta).encode())
        arrays = [s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s) for s in states]
        for a in arrays:
            if a.ndim != 2 or a.shape[1] != self.width or not 1 <= a.shape[0] <= self.meta["max_tokens"]:
                raise ValueError(f"text feature store: states must be (1..{self.meta['max_tokens']}, "
                                 f"{self.width}); got {a.shape}")
        block = np.ascontiguousarray(np.concatenate(arrays).astype(np.float16, copy=False))
        start = self.committed_rows
        lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
        entries = np.zeros(len(arrays), dtype=INDEX_DTYPE)
        entries["key"] = [bytes.fromhex(k) for k in keys]
        entries["offset"] = start + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        entries["length"] = lengths
        index = np.concatenate([self.index, entries])
        try:
            with open(self.array_path, "ab") as handle:
                handle.truncate(start * self.row_bytes)  # cut off rows of an unfinished chunk
                handle.seek(start * self.row_bytes)
                handle.write(memoryview(block).cast("B"))
                handle.flush()
                os.fsync(handle.fileno())
            write_bytes(self.index_path, _index_bytes(index))  # the commit
        except OSError as exc:  # not committed (a full disk): the chunk's rows go, the store is as it was
            self._cut(start)
            if exc.filename is not None:
                raise
            raise OSError(exc.errno, exc.strerror, str(self.array_path)) from exc
        self.index = index
        self._sorted = None

    def _cut(self, rows: int) -> None:
        """Cut `states.f16` to its first `rows` token rows (giving back the space of rows past them)."""
        try:
            os.truncate(self.array_path, rows * self.row_bytes)
        except OSError:
            pass  # the next writer cuts them (module docstring)

    def append(self, keys: Sequence[str], states: Sequence[np.ndarray | torch.Tensor]) -> None:
        """Add the records `keys` (hex, see entry_key) with token states (n_i, width) as one committed chunk.

        Keys the store already holds (another process may have added them) are skipped.
        """
        with self._locked():
            have = self.rows_of(keys) >= 0
            self._append_locked([k for k, h in zip(keys, have) if not h],
                                [s for s, h in zip(states, have) if not h])

    def get_or_compute(self, encoder, texts: Sequence[str], batch_size: int = 32,
                       chunk: int = DEFAULT_CHUNK, device: str | torch.device | None = None,
                       progress: Optional[bool] = None) -> tuple["TokenStates", Optional[EncodingReport]]:
        """The token states of each text as a TokenStates view, encoding (with `encoder.encode`) only
        the texts the store does not hold yet, `chunk` texts at a time, each chunk committed.

        `encoder` needs `identity` (that of the store), `hidden_size` and
        `encode(texts, max_tokens, batch_size, device, progress)`. Returns (view, report of what was
        encoded or None when nothing was). `progress`: a tqdm bar (None: only on a terminal).
        """
        if encoder.identity != self.meta["identity"] or encoder.hidden_size != self.width:
            raise ValueError(f"text feature store {self.folder}: holds another encoder's states")
        max_tokens = self.meta["max_tokens"]
        keys = [entry_key(self.meta["identity"], max_tokens, str(t)) for t in texts]
        report = None
        if np.any(self.rows_of(keys) < 0):
            with self._locked():
                missing = {}
                for k, t, held in zip(keys, texts, self.rows_of(keys) >= 0):
                    if not held:
                        missing.setdefault(k, str(t))
                report = self._encode_missing(encoder, missing, batch_size, chunk, device, progress)
        rows = self.rows_of(keys)
        if np.any(rows < 0):  # cannot happen unless the files changed under the lock
            raise UserError(f"text feature store {self.folder}: records missing after encoding them")
        return self.view(rows), report

    def _encode_missing(self, encoder, missing: dict, batch_size, chunk, device, progress) -> Optional[EncodingReport]:
        if not missing:
            return None
        started, tokens = time.perf_counter(), 0
        items = list(missing.items())
        with tqdm(total=len(items), unit="report", desc="encoding reports", disable=None if progress is None
                  else not progress, leave=False) as bar:
            for at in range(0, len(items), max(1, int(chunk))):
                part = items[at:at + max(1, int(chunk))]
                states = encoder.encode([t for _, t in part], max_tokens=self.meta["max_tokens"],
                                        batch_size=batch_size, device=device, progress=bar.update)
                self._append_locked([k for k, _ in part], states)
                tokens += sum(int(s.shape[0]) for s in states)
        return EncodingReport(len(items), tokens, time.perf_counter() - started, str(getattr(encoder, "device", device)))


class TokenStates:
    """Token states of some records of a store, item i = record i's (n_i, W) float16 CPU tensor.

    Holds the array's path and each record's offset and length (`lengths`, from the index), not
    the states. Each process opens its own read-only file descriptor on first read (it is never
    pickled: DataLoader workers and DDP ranks each open theirs and share the file's pages through
    the page cache) and reads a record with one positional read (os.preadv) into a new buffer.

    Not a memory map: on Linux 6.x a page fault on a file mapping maps the whole large folio of the
    page cache around it, so a process reading random records through np.memmap ends up with the
    whole file in its RSS (benchmarks/README.md, text store); positional reads keep the process's
    memory to the records it holds.
    """

    def __init__(self, path: Path, width: int, rows: int, offsets: np.ndarray, lengths: np.ndarray):
        self.path, self.width, self.rows = Path(path), int(width), int(rows)
        self.offsets, self.lengths = offsets, lengths
        self._fd: Optional[int] = None
        self._pid: Optional[int] = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"], state["_pid"] = None, None
        return state

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    def _truncated(self, size: int) -> UserError:
        return UserError(f"text feature store {self.path}: holds {size} bytes, its index needs "
                         f"{self.rows * 2 * self.width} (truncated); run again to rebuild it")

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            size = self.path.stat().st_size if self.path.exists() else 0
            if size < self.rows * 2 * self.width:
                raise self._truncated(size)
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getitem__(self, i: int) -> torch.Tensor:
        n = int(self.lengths[i])
        buffer = bytearray(n * 2 * self.width)
        if n and os.preadv(self._file(), [buffer], int(self.offsets[i]) * 2 * self.width) != len(buffer):
            raise self._truncated(self.path.stat().st_size)
        return torch.frombuffer(buffer, dtype=torch.float16).view(n, self.width)
