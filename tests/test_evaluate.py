"""Per-class ROC AUC against known values, undefined classes, and the table layout."""

import numpy as np
import pytest

from vkd_pyro.training.evaluate import auc_metrics, format_auc_table


def test_auc_known_values_and_undefined_class():
    labels = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 0], [0, 0, 1]], dtype=float)
    probs = np.array([[0.9, 0.1, 0.8], [0.2, 0.4, 0.3], [0.4, 0.3, 0.6], [0.6, 0.2, 0.7]])
    m = auc_metrics(labels, probs, ["a", "b", "c"])
    # class a: positives {0.9, 0.4}, negatives {0.2, 0.6}: pairs won 0.9>0.2, 0.9>0.6, 0.4>0.2 = 3/4
    assert m["auc"]["a"] == pytest.approx(0.75)
    assert m["auc"]["b"] is None  # one label value in the split: left out of the macro average
    # class c: positives {0.8, 0.3, 0.7}, negative {0.6}: 2/3
    assert m["auc"]["c"] == pytest.approx(2 / 3)
    assert m["macro_auc"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert m["positives"] == {"a": 2, "b": 0, "c": 3}


def test_table_has_a_row_per_class_and_averages():
    m = {"auc": {"a": 0.75, "b": None}, "macro_auc": 0.75, "micro_auc": 0.7}
    table = format_auc_table({"vkd": m}, ["a", "b"], {"a": 2, "b": 0})
    lines = table.splitlines()
    assert "vkd" in lines[0] and "positives" in lines[0]
    assert lines[2].split() == ["a", "0.750", "2"] and lines[3].split() == ["b", "-", "0"]
    assert lines[-2].split()[-1] == "0.750" and lines[-1].split() == ["Micro", "0.700"]


def test_predictions_round_trip_atomically(tmp_path):
    from vkd_pyro.training.predictions import read_predictions, write_predictions

    rng = np.random.default_rng(0)
    probs, labels = rng.random((5, 3)), (rng.random((5, 3)) < 0.5).astype(float)
    mask = np.ones((5, 3))
    mask[0, 1] = 0
    path = write_predictions(tmp_path, "test", probs, labels, ["a", "b", "c"], mask=mask,
                             record_ids=[f"CXR{i}" for i in range(5)], meta={"seed": 2, "objective": "vkd"})
    assert path == tmp_path / "predictions_test.npz"
    assert [p.name for p in tmp_path.iterdir()] == ["predictions_test.npz"]  # no temporary file left
    got = read_predictions(tmp_path)
    assert np.allclose(got.probs, probs.astype(np.float32)) and np.array_equal(got.labels, labels)
    assert got.mask.dtype == bool and not got.mask[0, 1] and got.mask.sum() == 14
    assert got.classes == ["a", "b", "c"] and list(got.record_ids) == [f"CXR{i}" for i in range(5)]
    assert got.meta == {"split": "test", "seed": 2, "objective": "vkd"}
    write_predictions(tmp_path, "validation", probs, labels, ["a", "b", "c"])
    val = read_predictions(tmp_path / "predictions_validation.npz")
    assert val.record_ids is None and val.mask.all()


def test_predictions_bad_input(tmp_path):
    from vkd_pyro.errors import UserError
    from vkd_pyro.training.predictions import read_predictions, write_predictions

    with pytest.raises(UserError, match="no predictions file"):
        read_predictions(tmp_path)
    (tmp_path / "predictions_test.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot be read as a predictions file"):
        read_predictions(tmp_path)
    with pytest.raises(ValueError, match="must both be"):
        write_predictions(tmp_path, "test", np.zeros((2, 3)), np.zeros((2, 2)), ["a", "b", "c"])
