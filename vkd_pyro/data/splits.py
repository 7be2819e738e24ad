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


def _subset_key(seed: int, group: str) -> str:
    """The order in which groups join the training subset: sha256 of "subset:<seed>:<group>"
    (a stream apart from the split's own order, so the subset is not the head of the split)."""
    return hashlib.sha256(f"subset:{seed}:{group}".encode()).hexdigest()


def reduce_train(indices: dict[str, np.ndarray], groups: Sequence[str], fraction: float,
                 seed: int = 0) -> tuple[dict[str, np.ndarray], str]:
    """`indices` (split name -> record indices) with the training split cut to `fraction` of its
    groups, and a one-line note with the fraction and the record counts.

    The training groups are ordered by sha256("subset:<seed>:<group>") and the first
    round(fraction * n_groups) are kept (at least one), so the subset is a function of the group
    ids and `seed` (data.split_seed) alone: the same on every machine and for every training seed,
    and nested (the 0.1 subset lies inside the 0.3 subset). A kept group keeps all its records
    (images, reports and labels travel together); validation and test are returned unchanged.
    `fraction` must be in (0, 1]; 1 returns the training split as it is.
    """
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train fraction must be in (0, 1], got {fraction}")
    train = np.asarray(indices["train"], dtype=np.int64)
    out = dict(indices)
    if fraction < 1.0 and len(train):
        unique = sorted({groups[i] for i in train}, key=lambda g: _subset_key(seed, g))
        keep = set(unique[:max(1, int(round(fraction * len(unique))))])
        out["train"] = np.asarray([i for i in train if groups[i] in keep], dtype=np.int64)
    note = f"train_fraction {fraction:g}: {len(out['train'])} of {len(train)} training records"
    return out, note


def split_record_ids(split) -> list[str]:
    """The names of a split's records, in split order (:func:`record_names`); `split` is a
    `vkd_pyro.data.batching.PairedSplit`."""
    names = record_names(split.base)
    return [names[int(i)] for i in split.indices]


def record_names(dataset) -> list[str]:
    """The name of each record of `dataset`: its `csv["record"]` column when it has one (an image id of
    the real datasets), else its groups (the report id of openi_phantom, one record per report)."""
    csv = getattr(dataset, "csv", None)
    if csv is not None and "record" in getattr(csv, "columns", ()):
        return [str(n) for n in csv["record"]]
    return [str(g) for g in dataset.groups]
