"""A split's test-time predictions on disk: `predictions_<split>.npz` in a run folder.

Arrays: `probs` (N, C) float32, the predictive probabilities of Algorithm 2; `labels` (N, C)
float32; `mask` (N, C) uint8, 1 where the label is known (all ones when the dataset has no label
mask); `record_ids` (N,) str, the record names when known (else absent); `classes` (C,) str; `meta`,
a JSON object (split, seed, objective, ...). Rows are the split's records in split order, so two
runs on the same split and `data.split_seed` have the same rows, which `vkd_pyro.analysis.compare` checks.

Written atomically (`vkd_pyro.files`), so a reader never sees
half a file. numpy only: no torch, so `vkd_pyro.analysis.compare` can read runs quickly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from vkd_pyro.errors import UserError
from vkd_pyro.files import atomic_path


@dataclass
class Predictions:
    """One run's predictions on one split (see the module docstring)."""

    probs: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    classes: list[str]
    record_ids: Optional[np.ndarray] = None
    meta: dict = field(default_factory=dict)


def predictions_path(run_dir: os.PathLike, split: str = "test") -> Path:
    """The predictions file of `split` in a run folder."""
    return Path(run_dir) / f"predictions_{split}.npz"


def write_predictions(run_dir: os.PathLike, split: str, probs: np.ndarray, labels: np.ndarray,
                      classes: Sequence[str], mask: Optional[np.ndarray] = None,
                      record_ids: Optional[Sequence[str]] = None, meta: Optional[dict] = None) -> Path:
    """Write `predictions_<split>.npz` into `run_dir` atomically and return its path.

    `probs` and `labels` are (N, C) with C = len(classes); `mask` (N, C) (1 = label known) or None
    (all known); `record_ids` N names or None; `meta` a JSON-serialisable dict (split is added).
    """
    probs = np.asarray(probs, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.float32)
    if probs.ndim != 2 or probs.shape != labels.shape or probs.shape[1] != len(classes):
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} must both be (N, {len(classes)})")
    mask = np.ones(probs.shape, np.uint8) if mask is None else (np.asarray(mask) > 0).astype(np.uint8)
    if mask.shape != probs.shape:
        raise ValueError(f"mask {mask.shape} must have the shape of probs {probs.shape}")
    arrays = {"probs": probs, "labels": labels, "mask": mask, "classes": np.asarray(list(classes), dtype=str),
              "meta": np.asarray(json.dumps({"split": split, **(meta or {})}))}
    if record_ids is not None:
        ids = np.asarray([str(r) for r in record_ids], dtype=str)
        if len(ids) != len(probs):
            raise ValueError(f"{len(ids)} record ids for {len(probs)} rows")
        arrays["record_ids"] = ids
    path = predictions_path(run_dir, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path


def read_predictions(run: os.PathLike, split: str = "test") -> Predictions:
    """The predictions of `split` from a run folder (or a predictions .npz file itself).

    A missing or unreadable file raises UserError with one line naming it.
    """
    path = Path(run)
    if path.is_dir():
        path = predictions_path(path, split)
    if not path.is_file():
        raise UserError(f"{path}: no predictions file (runs write predictions_<split>.npz when they "
                        "evaluate; older runs have only metrics.json: evaluate them again)")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            missing = {"probs", "labels", "mask", "classes"} - files
            if missing:
                raise UserError(f"{path}: not a predictions file (lacks {', '.join(sorted(missing))})")
            return Predictions(
                probs=z["probs"].astype(np.float64), labels=z["labels"].astype(np.float64),
                mask=z["mask"].astype(bool), classes=[str(c) for c in z["classes"]],
                record_ids=z["record_ids"] if "record_ids" in files else None,
                meta=json.loads(str(z["meta"])) if "meta" in files else {})
    except UserError:
        raise
    except Exception as exc:  # zip, format and JSON errors alike
        raise UserError(f"{path}: cannot be read as a predictions file ({type(exc).__name__}: {exc})") from None
