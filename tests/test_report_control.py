"""Report controls (vkd_pyro.data.report_control): `shuffled` is a derangement within the training
split, `labels` texts name exactly the record's (training) positive classes, validation and test
reports are never changed, and an objective that does not read reports refuses a control."""

import numpy as np
import pytest

from tests.conftest import phantom_config
from vkd_pyro.classes import CLASSES
from vkd_pyro.config import config_from_dict
from vkd_pyro.data.report_control import derangement, labels_text
from vkd_pyro.data.training_split import training_splits
from vkd_pyro.errors import ConfigError
from vkd_pyro.objectives import objective_for


@pytest.mark.parametrize("count", [2, 3, 10, 1001])
def test_derangement_moves_every_position(count):
    out = derangement(count, seed=0)
    assert sorted(out.tolist()) == list(range(count))  # a permutation
    assert not np.any(out == np.arange(count))  # nobody keeps its own
    np.testing.assert_array_equal(out, derangement(count, seed=0))  # fixed by the seed
    if count > 3:
        assert not np.array_equal(out, derangement(count, seed=1))


def test_shuffled_reports_are_a_derangement_within_the_training_split(phantom_factory):
    clean = phantom_factory()
    ds = phantom_factory()
    indices, notes, entries = training_splits(ds, phantom_config(report_control="shuffled", train_fraction=0.5))
    train = indices["train"]
    # each training record reads the report of another training record, each report read once
    assert sorted(ds.texts[i] for i in train) == sorted(clean.texts[i] for i in train)
    unique = [i for i in train if sum(clean.texts[j] == clean.texts[i] for j in train) == 1]
    assert len(unique) > 0.8 * len(train)
    assert all(ds.texts[i] != clean.texts[i] for i in unique)  # a report only its own record had has moved
    for split in ("validation", "test"):
        assert [ds.texts[i] for i in indices[split]] == [clean.texts[i] for i in indices[split]]
    untouched = sorted(set(range(len(ds))) - set(train) - set(indices["validation"]) - set(indices["test"]))
    assert [ds.texts[i] for i in untouched] == [clean.texts[i] for i in untouched]  # cut by train_fraction
    np.testing.assert_array_equal(ds.labels, clean.labels)
    assert entries["report_control"]["records"] == len(train) and "shuffled" in notes[-1]


def test_labels_texts_name_exactly_the_training_labels_after_noise(phantom_factory):
    clean = phantom_factory()
    ds = phantom_factory()
    indices, _, _ = training_splits(ds, phantom_config(report_control="labels", label_noise=0.4))
    for i in indices["train"]:
        named = ds.texts[i].removeprefix("Findings: ").removesuffix(".")
        positives = {c for c, v in zip(CLASSES, ds.labels[i]) if v > 0.5}
        assert (set() if named == "none" else set(named.split(", "))) == positives
    assert (ds.labels[indices["train"]] != clean.labels[indices["train"]]).any()  # the noisy labels are named
    for split in ("validation", "test"):
        assert [ds.texts[i] for i in indices[split]] == [clean.texts[i] for i in indices[split]]
    assert labels_text(np.zeros(len(CLASSES))) == "Findings: none."


@pytest.mark.parametrize("objective", ["image_only"])
@pytest.mark.parametrize("control", ["shuffled", "labels"])
def test_an_objective_that_does_not_read_reports_refuses_a_control(objective, control):
    cfg = config_from_dict({"inference": {"objective": objective}, "data": {"report_control": control}})
    with pytest.raises(ConfigError, match=r"^data.report_control: objective image_only does not read the reports"):
        objective_for(cfg).check()
    objective_for(config_from_dict({"data": {"report_control": control}})).check()  # vkd reads them
