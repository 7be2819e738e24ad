"""Deterministic splits by group (a report, a patient), so that no group straddles two splits."""

from __future__ import annotations

import hashlib
from typing import Sequence

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
