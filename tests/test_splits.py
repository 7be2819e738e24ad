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


def _train_groups(groups, idx):
    return {groups[i] for i in idx}


def test_reduce_train_is_stable_nested_and_leaves_validation_and_test():
    from vkd_pyro.data.splits import reduce_train

    groups = [f"patient{i // 2}" for i in range(2000)]  # two records a patient
    splits = split_by_group(groups, [0.7, 0.1, 0.2], seed=3)
    small, note = reduce_train(splits, groups, 0.1, seed=3)
    mid, _ = reduce_train(splits, groups, 0.3, seed=3)
    again, _ = reduce_train({k: v.copy() for k, v in splits.items()}, list(groups), 0.1, seed=3)
    assert np.array_equal(small["train"], again["train"])
    assert _train_groups(groups, small["train"]) <= _train_groups(groups, mid["train"])
    assert _train_groups(groups, mid["train"]) <= _train_groups(groups, splits["train"])
    assert len(_train_groups(groups, small["train"])) == 70  # 10% of 700 training patients
    assert len(small["train"]) == 140  # every kept patient keeps both records
    assert all(np.array_equal(small[k], splits[k]) for k in ("validation", "test"))
    assert note == "train_fraction 0.1: 140 of 1400 training records"
    other, _ = reduce_train(splits, groups, 0.1, seed=4)
    assert not np.array_equal(other["train"], small["train"])  # a function of split_seed
    # not simply the head of the split's own order
    assert not np.array_equal(np.sort(small["train"]), np.sort(splits["train"][:140]))


def test_reduce_train_full_fraction_and_bad_fraction():
    import pytest

    from vkd_pyro.data.splits import reduce_train

    groups = [f"CXR{i}" for i in range(50)]
    splits = split_by_group(groups, [0.6, 0.2, 0.2])
    full, note = reduce_train(splits, groups, 1.0)
    assert np.array_equal(full["train"], splits["train"]) and note == "train_fraction 1: 30 of 30 training records"
    tiny, _ = reduce_train(splits, groups, 0.001)
    assert len(tiny["train"]) == 1  # never empty
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="train fraction"):
            reduce_train(splits, groups, bad)


def test_train_fraction_config_key_is_validated():
    import pytest

    from vkd_pyro.config import DataConfig, config_from_dict
    from vkd_pyro.errors import ConfigError

    assert DataConfig().train_fraction == 1.0
    for bad in (0.0, 1.2):
        with pytest.raises(ConfigError, match="data.train_fraction"):
            config_from_dict({"data": {"train_fraction": bad}})
    assert config_from_dict({"data": {"train_fraction": 0.25}}).data.train_fraction == 0.25
