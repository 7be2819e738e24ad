"""Label noise in the training labels only (`data.label_noise`, `data.label_noise_kind`).

Report-derived labels err in two ways (docs/labels.md, "Label noise"): a labeller misses findings
the report states, and picks up findings the report hedges or negates. Two models of that:

- `symmetric` (class-conditional, prevalence kept): a positive label of class c becomes negative with
  probability r, a negative one becomes positive with probability r p_c / (1 - p_c), where p_c is
  class c's prevalence among the training split's known labels, so that the expected number of
  positives is unchanged: P (1 - r) + (N - P) r P / (N - P) = P. (When r p_c / (1 - p_c) > 1, i.e.
  p_c > 1 / (1 + r), it is capped at 1.)
- `missed`: a positive label becomes negative with probability r; negatives stay (prevalence falls
  to (1 - r) p_c).

Whether label (record, c) flips is decided by one uniform number u(seed, record, c), the first 8 bytes
of sha256("label-noise:<seed>:<record>:<c>") / 2^64, against the flip probability of its clean value:
the noisy labels are a function of (data.split_seed, record, class) and the clean labels alone, the
same for every objective and training seed, and nested training fractions see the same noise (p_c is
taken over the whole training split, before `data.train_fraction` cuts it). Labels that are unknown
(label mask 0) are never flipped. Validation and test labels are never changed.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import numpy as np

from vkd_pyro.classes import CLASSES

KINDS = ("symmetric", "missed")


def label_uniforms(seed: int, records: Sequence[str], num_classes: int) -> np.ndarray:
    """(N, C) float64 in [0, 1): u[i, c] = int(sha256("label-noise:<seed>:<records[i]>:<c>")[:8]) / 2^64."""
    out = np.empty((len(records), num_classes), dtype=np.float64)
    for i, record in enumerate(records):
        for c in range(num_classes):
            digest = hashlib.sha256(f"label-noise:{seed}:{record}:{c}".encode()).digest()
            out[i, c] = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    return out


def flip_probabilities(labels: np.ndarray, known: Optional[np.ndarray], rate: float, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(to_negative (C,), to_positive (C,)): the probability that a positive label of each class
    becomes negative (r) and that a negative one becomes positive (`symmetric`: min(1, r p_c / (1 - p_c))
    with p_c the prevalence among known labels; `missed`: 0)."""
    if kind not in KINDS:
        raise ValueError(f"label noise kind must be one of {', '.join(KINDS)}, got {kind!r}")
    num_classes = labels.shape[1]
    to_negative = np.full(num_classes, float(rate))
    if kind == "missed":
        return to_negative, np.zeros(num_classes)
    weights = np.ones_like(labels) if known is None else known
    counted = weights.sum(0)
    prevalence = np.divide((labels * weights).sum(0), counted, out=np.zeros(num_classes), where=counted > 0)
    odds = np.divide(prevalence, 1.0 - prevalence, out=np.zeros(num_classes), where=prevalence < 1.0)
    return to_negative, np.minimum(1.0, rate * odds)


def noisy_labels(labels: np.ndarray, known: Optional[np.ndarray], records: Sequence[str], rate: float,
                 kind: str, seed: int) -> np.ndarray:
    """A copy of `labels` (N, C in {0, 1}) with each known label flipped when
    u(seed, record, c) < its flip probability (:func:`flip_probabilities`; the module docstring)."""
    labels = np.asarray(labels, dtype=np.float32)
    if rate <= 0 or not len(labels):
        return labels.copy()
    to_negative, to_positive = flip_probabilities(labels, known, rate, kind)
    u = label_uniforms(seed, records, labels.shape[1])
    flip = np.where(labels > 0.5, u < to_negative, u < to_positive)
    if known is not None:
        flip &= np.asarray(known) > 0.5
    return np.where(flip, 1.0 - labels, labels).astype(np.float32)


def apply_label_noise(dataset, train: np.ndarray, records: Sequence[str], rate: float, kind: str,
                      seed: int) -> dict:
    """Replace the labels of the training records `train` (dataset indices) of `dataset` in place by
    :func:`noisy_labels`; return the card's entry: rate, kind, seed and, per class, the positives
    before and after and the labels changed each way."""
    train = np.asarray(train, dtype=np.int64)
    clean = np.asarray(dataset.labels[train], dtype=np.float32)
    mask = getattr(dataset, "label_mask", None)
    known = None if mask is None else np.asarray(mask[train])
    noisy = noisy_labels(clean, known, [records[i] for i in train], rate, kind, seed)
    dataset.labels[train] = noisy
    return {
        "rate": float(rate), "kind": kind, "seed": int(seed), "records": int(len(train)),
        "positives_before": {c: int(clean[:, k].sum()) for k, c in enumerate(CLASSES)},
        "positives_after": {c: int(noisy[:, k].sum()) for k, c in enumerate(CLASSES)},
        "to_negative": {c: int(((clean[:, k] > 0.5) & (noisy[:, k] < 0.5)).sum()) for k, c in enumerate(CLASSES)},
        "to_positive": {c: int(((clean[:, k] < 0.5) & (noisy[:, k] > 0.5)).sum()) for k, c in enumerate(CLASSES)},
    }


def describe(entry: dict) -> str:
    """One line for the log: how many training labels the noise changed."""
    down, up = sum(entry["to_negative"].values()), sum(entry["to_positive"].values())
    return (f"label noise ({entry['kind']}, r = {entry['rate']:g}, seed {entry['seed']}) on the "
            f"{entry['records']} training records: {down + up} labels changed ({down} positive -> negative, "
            f"{up} negative -> positive); validation and test labels untouched")
