"""Splits by group: deterministic, disjoint, in the asked proportions, groups never straddle."""

import numpy as np

from vkd_pyro.data.splits import split_by_group


def test_split_is_deterministic_disjoint_and_proportional():
    groups = [f"CXR{i}" for i in range(1000)]
    a = split_by_group(groups, [0.7, 0.1, 0.2])
    b = split_by_group(list(groups), [0.7, 0.1, 0.2])
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [len(a[k]) for k in ("train", "validation", "test")] == [700, 100, 200]
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(1000))
    c = split_by_group(groups, [0.7, 0.1, 0.2], seed=1)
    assert not np.array_equal(a["test"], c["test"])


def test_groups_do_not_straddle_splits():
    groups = [f"patient{i // 3}" for i in range(300)]  # three records a patient
    splits = split_by_group(groups, [0.6, 0.2, 0.2])
    owner = {}
    for name, idx in splits.items():
        for i in idx:
            assert owner.setdefault(groups[i], name) == name
