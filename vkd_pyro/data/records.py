"""What the dataset loaders share: bad-record bookkeeping, table checks and the dataset class.

A loader (`openi`, `mimic_cxr`, `chestxray14`, `openi_phantom`) reads its source into candidate
records (one per image it would use), reports each bad record to a :class:`BadRecords` and hands
the rest to :class:`XRayDataset`, which loads every image once (the real datasets decode their files
through the on-disk cache, `vkd_pyro.data.image_cache`; `openi_phantom` renders its images) and
keeps the records whose image could be read.

Bad records follow `data.on_bad_record`: `error` raises a DataError naming the record and what is
wrong with it at the first one; `skip` leaves it out and counts it by reason (`dataset.skipped`,
shown by `vkd-pyro data check`, the training log and metrics.json). Records that are left out by
design whatever the policy (a report without FINDINGS or IMPRESSION, as in `openi_phantom`) are
counted in `skipped` too; records not selected (lateral views, further frontal images of a report
under `multi_image=first`) are counted in `dataset.selection`. Nothing is dropped without a count.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from vkd_pyro.classes import CLASSES, NUM_CLASSES
from vkd_pyro.data.decode import to_unit_float
from vkd_pyro.data.image_cache import load_or_decode
from vkd_pyro.errors import DataError

SKIP_HINT = ("set data.on_bad_record=skip to leave such records out (they are then counted in the "
             "dataset card, the training log and metrics.json)")
#: How many example records `skipped_examples` keeps per reason.
EXAMPLES_PER_REASON = 3


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


class BadRecords:
    """The `data.on_bad_record` policy: `error` raises at the first bad record, `skip` counts them.

    `counts` maps a reason to the number of records left out for it; `examples` keeps the first
    few record names per reason.
    """

    def __init__(self, policy: str):
        if policy not in ("error", "skip"):
            raise ValueError(f"on_bad_record policy {policy!r}: use error or skip")
        self.policy = policy
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def __call__(self, record: str, reason: str, detail: str = "") -> None:
        """Report one bad record: raise DataError (`error`) or count it under `reason` (`skip`)."""
        if self.policy == "error":
            more = f" ({one_line(detail)})" if detail else ""
            raise DataError(f"{record}: {reason}{more}; {SKIP_HINT}")
        self.leave_out(record, reason)

    def leave_out(self, record: str, reason: str) -> None:
        """Count a record left out under `reason` whatever the policy."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(str(record))


def require_folder(root: Optional[str], dataset: str, expected: str, source: str, key: str = "data.root") -> Path:
    """`root` as an existing folder, or a one-line DataError saying what belongs there and where from."""
    if root is None or str(root).strip() == "":
        raise DataError(f"{key}: dataset {dataset} needs {key}, the folder with {expected} ({source})")
    path = Path(os.path.expanduser(str(root)))
    if not path.is_dir():
        raise DataError(f"{path}: folder not found ({key} of dataset {dataset}); expected {expected} there ({source})")
    return path


def require_file(path: Path, what: str, source: str) -> Path:
    """`path` as an existing file, or a one-line DataError naming it, what it is and where from."""
    if not path.is_file():
        raise DataError(f"{path}: not found; expected {what} there ({source})")
    return path


def read_table(path: Path, what: str, source: str, columns: Sequence[str], **options) -> pd.DataFrame:
    """The CSV (or .csv.gz) table at `path` with at least `columns`; one-line DataErrors otherwise."""
    require_file(path, what, source)
    try:
        table = pd.read_csv(path, **options)
    except Exception as exc:  # gzip, encoding and parser errors alike
        raise DataError(f"{path}: cannot be read as the {what} ({type(exc).__name__}: "
                        f"{one_line(exc)[:160]}); {source}") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{path}: the {what} lacks column(s) {', '.join(missing)} "
                        f"(expected {', '.join(columns)}); {source}")
    return table


def first_groups(groups: Iterable[str], count: Optional[int]) -> Optional[set]:
    """The first `count` distinct groups in order of appearance (None when count is None)."""
    if count is None:
        return None
    chosen: dict[str, None] = {}
    for group in groups:
        if len(chosen) >= count:
            break
        chosen.setdefault(group, None)
    return set(chosen)


class RowView:
    """Rows `rows` of an (N, H, W) array, indexed 0..len(rows)-1, without copying the array."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array = array
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple:
        return (len(self.rows),) + tuple(self.array.shape[1:])

    def __getitem__(self, i: int) -> np.ndarray:
        return self.array[int(self.rows[i])]


class XRayDataset(Dataset):
    """A chest X-ray dataset in torchxrayvision's style, with what vkd-pyro's trainer reads.

    Each source is a subclass whose docstring says where its data comes from. It is built from
    candidate records (a DataFrame with columns `record` (a name quoted in messages), `group` (the
    split unit: report or patient), `view`, `path` (the image file, read by :meth:`load_images`)
    and, for datasets with an official split, `split` (train, validation or test)), their labels
    (N, 14) and label mask (N, 14, 1 = known; None when every label is known) and report texts
    (None for image-only datasets). Every image is loaded once by :meth:`load_images` (decoded
    through the cache; `openi_phantom` renders instead); records whose image is bad go to `bad`.
    Attributes:

    - `name`, `image_size`, `pathologies` (the 14 classes), `labels` (N, 14) float32, `label_mask`
      (N, 14) float32 or None, `csv` (the kept records), `texts`, `groups`, `views`, `images`
      ((N, size, size) uint8 rows);
    - `skipped` (reason -> records left out), `skipped_examples` (reason -> a few record names),
      `selection` (records not selected by design, reason -> count);
    - `official_split` (split name -> record indices) when the release defines one, else absent.

    `ds[i]` is {"idx", "img" (1, size, size) float32 in [0, 1] (`vkd_pyro.data.decode.to_unit_float`
    of the uint8 image), "lab" (14,)} plus "lab_mask" (14,) when the dataset has a label mask.
    """

    pathologies = list(CLASSES)

    def __init__(self, name: str, records: pd.DataFrame, labels: np.ndarray, label_mask: Optional[np.ndarray],
                 texts: Optional[Sequence[str]], image_size: int, cache_dir: Optional[os.PathLike],
                 bad: BadRecords, selection: Optional[dict] = None, workers: int = 0, say=None):
        records = records.reset_index(drop=True)
        labels = np.asarray(labels, dtype=np.float32).reshape(len(records), NUM_CLASSES)
        keep = np.ones(len(records), dtype=bool)

        def on_bad(index: int, reason: str, detail: str) -> None:
            keep[index] = False
            bad(f"{records.at[index, 'path']} (record {records.at[index, 'record']})", reason, detail)

        self.name = name
        self.image_size = int(image_size)
        array = self.load_images(records, cache_dir, on_bad, workers, say)
        rows = np.flatnonzero(keep)
        self.images = array if len(rows) == len(records) else RowView(array, rows)
        self.csv = records.iloc[rows].reset_index(drop=True)
        self.labels = labels[rows]
        self.label_mask = None if label_mask is None else np.asarray(label_mask, dtype=np.float32)[rows]
        self.texts = None if texts is None else [str(texts[i]) for i in rows]
        self.groups = [str(g) for g in self.csv["group"]]
        self.views = [str(v) for v in self.csv["view"]]
        self.skipped = dict(bad.counts)
        self.skipped_examples = {k: list(v) for k, v in bad.examples.items()}
        self.selection = dict(selection or {})
        if "split" in self.csv.columns:
            splits = self.csv["split"].to_numpy()
            self.official_split = {s: np.flatnonzero(splits == s).astype(np.int64)
                                   for s in ("train", "validation", "test")}

    def load_images(self, records: pd.DataFrame, cache_dir: Optional[os.PathLike],
                    on_bad: Callable[[int, str, str], None], workers: int, say) -> np.ndarray:
        """The (N, size, size) uint8 images of `records`, row for row: each `path` decoded once through
        the cache (`load_or_decode`); `on_bad(index, reason, detail)` for each file that cannot be."""
        return load_or_decode(list(records["path"]), self.image_size, cache_dir, self.name, on_bad,
                              workers=workers, progress=say)

    def __len__(self) -> int:
        return len(self.csv)

    def __getitem__(self, idx: int) -> dict:
        # numpy, single-threaded: torch's intra-op threads cost more than they save on one image
        img = torch.from_numpy(to_unit_float(self.images[idx])[None])
        item = {"idx": idx, "img": img, "lab": torch.from_numpy(self.labels[idx])}
        if self.label_mask is not None:
            item["lab_mask"] = torch.from_numpy(self.label_mask[idx])
        return item
