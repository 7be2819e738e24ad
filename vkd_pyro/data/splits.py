"""Deterministic splits by group (a report, a patient), so that no group straddles two splits."""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import numpy as np

SPLIT_NAMES = ("train", "validation", "test")


def split_by_group(groups: Sequence[str], fractions: Sequence[float], seed: int = 0) -> dict[str, np.ndarray]:
    """Record indices per split. Groups are ordered by sha256(seed:group), a stable pseudo-random
    order on any machine, and cut at the cumulative `fractions` (train, validation, test)."""
    unique = sorted(set(groups), key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    bounds = np.round(np.cumsum(fractions) / np.sum(fractions) * len(unique)).astype(int)
    assignment = {}
    start = 0
    for name, stop in zip(SPLIT_NAMES, bounds):
        for group in unique[start:stop]:
            assignment[group] = name
        start = stop
    members = {name: [] for name in SPLIT_NAMES}
    for index, group in enumerate(groups):
        members[assignment[group]].append(index)
    return {name: np.asarray(idx, dtype=np.int64) for name, idx in members.items()}


def dataset_splits(dataset, fractions: Sequence[float], seed: int = 0) -> dict[str, np.ndarray]:
    """Record indices per split of `dataset`: its `official_split` (split name -> indices) when it
    has one (MIMIC-CXR, ChestX-ray14), else `split_by_group(dataset.groups, fractions, seed)`."""
    official = getattr(dataset, "official_split", None)
    if official is not None:
        return {name: np.asarray(official.get(name, ()), dtype=np.int64) for name in SPLIT_NAMES}
    return split_by_group(dataset.groups, fractions, seed)


def split_label_mask(split) -> Optional[np.ndarray]:
    """The label mask (n, C) of a split's records (1 = label known), or None when every label is known.

    `split` is a `vkd_pyro.data.batching.PairedSplit`: rows follow `split.indices`, as predictions do.
    """
    mask = getattr(split.base, "label_mask", None)
    return None if mask is None else np.asarray(mask)[split.indices]
