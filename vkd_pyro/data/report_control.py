"""Controls for the privileged input (`data.report_control`): what the training reports are replaced by.

They tell knowledge from regularisation in objectives that read the reports (VKD's guide, the kd
teacher): only the *training* records' reports change; validation and test reports, the images and
the labels stay as they are.

- `none`: each record's own report.
- `shuffled`: each training record gets the report of another training record, by a fixed
  derangement of the training split (one cycle through a random order seeded by sha256 of
  "report-shuffle:<data.split_seed>", so no record keeps its own report when there are two or more):
  the report then says nothing about this image. If an objective does as well with shuffled reports
  as with the true ones, what helped was regularisation, not knowledge.
- `labels`: the report is replaced by a text listing the record's training labels (after
  `data.label_noise`), "Findings: Cardiomegaly, Pleural Effusion." or "Findings: none.": a privileged
  input that is a perfect copy of the training target.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from vkd_pyro.classes import CLASSES

CONTROLS = ("none", "shuffled", "labels")


def derangement(count: int, seed: int) -> np.ndarray:
    """(count,) int64: position i takes the report of position out[i]; out[i] != i for count >= 2. One
    cycle through an order drawn from a generator seeded by sha256("report-shuffle:<seed>")."""
    digest = hashlib.sha256(f"report-shuffle:{seed}".encode()).digest()
    order = np.random.default_rng(int.from_bytes(digest[:8], "big")).permutation(count)
    out = np.arange(count, dtype=np.int64)
    out[order] = np.roll(order, -1)  # order[k] takes the report of order[k + 1]
    return out


def labels_text(labels: np.ndarray) -> str:
    """The text that lists one record's positive classes: "Findings: A, B." or "Findings: none."."""
    positive = [c for c, v in zip(CLASSES, labels) if v > 0.5]
    return "Findings: " + (", ".join(positive) if positive else "none") + "."


def controlled_texts(texts: Sequence[str], labels: np.ndarray, train: np.ndarray, control: str,
                     seed: int) -> list[str]:
    """A copy of `texts` (one per dataset record) with the training records' (`train`, dataset
    indices) replaced as `control` says (module docstring); `labels` (N, C) are the training labels."""
    if control not in CONTROLS:
        raise ValueError(f"report control must be one of {', '.join(CONTROLS)}, got {control!r}")
    out = list(texts)
    train = np.asarray(train, dtype=np.int64)
    if control == "shuffled":
        source = train[derangement(len(train), seed)]
        for i, j in zip(train, source):
            out[i] = texts[j]
    elif control == "labels":
        for i in train:
            out[i] = labels_text(labels[i])
    return out


def apply_report_control(dataset, train: np.ndarray, control: str, seed: int) -> dict:
    """Replace `dataset.texts` in place by :func:`controlled_texts`; return the card's entry (control,
    seed, training records whose text changed, distinct training texts)."""
    texts = controlled_texts(dataset.texts, dataset.labels, train, control, seed)
    changed = sum(texts[i] != dataset.texts[i] for i in train)
    dataset.texts = texts
    return {"control": control, "seed": int(seed), "records": int(len(train)), "changed": int(changed),
            "distinct_training_texts": len({texts[i] for i in train})}


def describe(entry: dict) -> str:
    """One line for the log: what replaced the training reports."""
    what = {"shuffled": "another training record's report (a fixed derangement)",
            "labels": "a text listing the record's training labels"}[entry["control"]]
    return (f"report control {entry['control']}: each of the {entry['records']} training records reads {what}; "
            f"{entry['changed']} texts changed, {entry['distinct_training_texts']} distinct; "
            "validation and test reports untouched")
