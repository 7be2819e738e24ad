"""Decode X-ray files once, resized, into a uint8 array cached on disk (read back as a memmap).

Real datasets ship full-resolution PNG or JPEG files (MIMIC-CXR-JPG about 2500 x 3000 pixels,
ChestX-ray14 1024 x 1024); decoding one costs far more than a training step's share of it. So
every file of a dataset is decoded and resized exactly once, when the dataset is built, into one
array (N, size, size) uint8 saved as `<cache_dir>/images/<dataset>-<size>px-<key>.npy`, and read
back with `np.load(mmap_mode="r")`: DataLoader workers share its pages and an item costs a copy of
size * size bytes. The key is the sha256 of the cache format, the size and, for each file, its path,
byte size and modification time: a changed, added or removed file gives a new cache.

Decoding (`vkd_pyro.data.decode.decode_image`, the one decoder that `vkd-pyro predict` uses too)
also validates: a file that is missing, corrupt, truncated or too large is found here, before
training, never mid-epoch. Its index and reason are stored beside the array
(`<same name>.json`), so that a cached dataset reports the same bad files without decoding again.
A cache entry that cannot be used (an unreadable or truncated .npy, a wrong shape or dtype, a
missing or malformed .json) is decoded again and replaced, with a `CorruptCacheWarning` naming it.
A full disk is an OSError naming the .npy before any image is decoded (its blocks are reserved
first), and leaves neither the array nor its .json behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from vkd_pyro.data.decode import BadImage, decode_image  # BadImage: re-exported for the datasets
from vkd_pyro.files import atomic_path, write_json

#: Changes whenever decoding or resizing does: it keys the cache.
#: 2: one decoder with predict; >8-bit images scaled by their significant bit depth; DICOM.
#: 3: multi-page images refused.
CACHE_FORMAT = "xray-images-3"


class CorruptCacheWarning(UserWarning):
    """A cache entry (decoded images, rendered phantoms, text token states) could not be used and is
    being rebuilt; the message starts with the file."""


def read_cached_images(target: Path, count: int, size: int, mmap_mode: Optional[str] = "r"):
    """(array, "") when `target` holds a (count, size, size) uint8 array, else (None, why it cannot
    be used): unreadable (truncated, garbage, not an .npy), or of another shape or dtype."""
    try:
        images = np.load(target, mmap_mode=mmap_mode, allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, EOFError, OSError, zipfile.BadZipFile, ...
        return None, f"unreadable array: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    if not isinstance(images, np.ndarray):  # np.load opens a zip archive as an NpzFile
        images.close()
        return None, "unreadable array: a zip archive, not an .npy array"
    if images.dtype != np.uint8 or images.shape != (count, size, size):
        return None, f"array of {images.dtype} {tuple(images.shape)}, expected uint8 {(count, size, size)}"
    return images, ""


def warn_corrupt(target: Path, why: str, redo: str) -> None:
    """Warn (CorruptCacheWarning, naming `target`) that a cache entry cannot be used (`why`) and is
    rebuilt by `redo` ("decoding the 12 images again"); attributed to the caller's caller."""
    warnings.warn(f"{target}: corrupt image cache entry ({why}); {redo} to rebuild it", CorruptCacheWarning,
                  stacklevel=3)


def _read_cache(target: Path, count: int, size: int):
    """(images memmap, bad list) of a usable cache entry, or (None, why) when it cannot be used."""
    meta_path = target.with_suffix(".json")
    images, why = read_cached_images(target, count, size)
    if images is None:
        return None, why
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"unreadable {meta_path.name}: {type(exc).__name__}"
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        return None, f"{meta_path.name} is not a {CACHE_FORMAT} record"
    bad = meta.get("bad")
    valid = isinstance(bad, list) and all(
        isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], int) and 0 <= entry[0] < count
        and isinstance(entry[1], str) and isinstance(entry[2], str) for entry in bad)
    if not valid:
        return None, f"{meta_path.name} has a malformed list of bad files"
    return images, [tuple(entry) for entry in bad]


def _decode_job(job: tuple) -> tuple[int, Optional[np.ndarray], Optional[tuple[str, str]]]:
    index, path, size = job
    try:
        return index, decode_image(path, size), None
    except BadImage as exc:
        return index, None, (exc.reason, exc.detail)


def _file_stamp(path: str) -> tuple:
    try:
        st = os.stat(path)
        return (path, st.st_size, st.st_mtime_ns)
    except OSError:
        return (path, None, None)


def cache_key(paths: Sequence[str], size: int) -> str:
    """sha256 (24 hex digits) of the cache format, `size` and each file's path, byte size and mtime."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}\0{int(size)}\0{len(paths)}".encode())
    for path in paths:
        digest.update(repr(_file_stamp(str(path))).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def cache_path(cache_dir: os.PathLike, dataset: str, paths: Sequence[str], size: int) -> Path:
    """The .npy file that caches `paths` decoded at `size` for `dataset`."""
    return Path(cache_dir) / "images" / f"{dataset}-{int(size)}px-{cache_key(paths, size)}.npy"


def load_or_decode(paths: Sequence[str], size: int, cache_dir: Optional[os.PathLike], dataset: str,
                   on_bad: Callable[[int, str, str], None], workers: int = 0,
                   progress: Optional[Callable[[str], None]] = None) -> np.ndarray:
    """The images at `paths` as an (N, size, size) uint8 array (a read-only memmap when cached).

    Every file is decoded once (`decode_image`, in `workers` processes when > 1) and the result is
    cached under `cache_dir` (nothing is cached when it is None). For each bad file `on_bad(index,
    reason, detail)` is called in index order, on a fresh decode and on a cache hit alike; its row
    of the array is left black. `on_bad` may raise (the `error` policy): then nothing is cached.
    """
    paths = [str(p) for p in paths]
    size = int(size)
    target = cache_path(cache_dir, dataset, paths, size) if cache_dir is not None else None
    if target is not None and (target.exists() or target.with_suffix(".json").exists()):
        images, found = _read_cache(target, len(paths), size)
        if images is not None:
            for index, reason, detail in found:
                on_bad(int(index), reason, detail)
            return images
        warn_corrupt(target, found, f"decoding the {len(paths)} images again")

    started = time.perf_counter()
    bad: list[tuple[int, str, str]] = []
    jobs = [(i, p, size) for i, p in enumerate(paths)]
    if target is None:
        images = np.zeros((len(paths), size, size), dtype=np.uint8)
        _decode_into(images, bad, on_bad, jobs, workers, paths)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        meta = target.with_suffix(".json")
        try:  # decoded straight into the temporary file; the .json (the bad files) lands before the array
            with atomic_path(target, suffix=".npy") as tmp:
                images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size))
                _allocate(tmp)
                _decode_into(images, bad, on_bad, jobs, workers, paths)
                images.flush()
                del images
                write_json(meta, {"format": CACHE_FORMAT, "size": size, "count": len(paths), "bad": bad})
        except BaseException:
            meta.unlink(missing_ok=True)  # the array did not land: its record goes too
            raise
        images = np.load(target, mmap_mode="r")
    if progress is not None:
        seconds = time.perf_counter() - started
        progress(f"{dataset}: decoded {len(paths)} image files at {size} px in {seconds:.1f} s "
                 f"({len(paths) / max(seconds, 1e-9):.0f} images/s)" + (f"; cached in {target}" if target else ""))
    return images


def _allocate(path: Path) -> None:
    """Reserve the blocks of the whole file at `path` (a new memmap is a sparse file): a full disk
    is then an OSError here, not a SIGBUS that ends the process at the first row written to a page
    the file system cannot give. Where Python has no posix_fallocate (macOS), nothing is reserved."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _decode_into(images, bad, on_bad, jobs, workers, paths) -> None:
    """Decode `jobs` into the rows of `images` (in `workers` processes when > 1), in index order."""
    if workers > 1 and len(jobs) >= 4 * workers:
        with get_context("fork").Pool(workers) as pool:
            results = pool.imap(_decode_job, jobs, chunksize=max(1, min(64, len(jobs) // (8 * workers))))
            for index, array, failure in results:
                _store(images, bad, on_bad, index, array, failure, paths)
    else:
        for job in jobs:
            _store(images, bad, on_bad, *_decode_job(job), paths)


def _store(images, bad, on_bad, index, array, failure, paths) -> None:
    if failure is None:
        images[index] = array
        return
    reason, detail = failure
    on_bad(index, reason, detail)  # may raise (error policy)
    bad.append((index, reason, detail))
