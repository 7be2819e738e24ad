"""Paired bootstrap of the macro-AUC difference (vkd_pyro.analysis.compare) against independent computations."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from vkd_pyro.analysis.compare import format_comparison, paired_bootstrap, pooled_bootstrap, weighted_auc
from vkd_pyro.errors import UserError

CLASSES = ["a", "b", "c", "d"]


def _runs(n=300, seed=0, gap=0.0):
    """Labels (n, 4), two runs' probabilities; B is `gap` more informative than A. Class d is all 0."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 4)) < [0.3, 0.5, 0.1, 0.0]).astype(float)
    noise_a, noise_b = rng.normal(size=(2, n, 4))
    probs_a = 1 / (1 + np.exp(-(0.8 * labels + noise_a)))
    probs_b = 1 / (1 + np.exp(-((0.8 + gap) * labels + noise_b)))
    return labels, probs_a, probs_b


def test_weighted_auc_equals_sklearn_on_the_resampled_records():
    rng = np.random.default_rng(1)
    scores = np.round(rng.random(60), 1)  # many ties
    y = rng.random(60) < 0.4
    idx = rng.integers(0, 60, size=(5, 60))
    counts = np.stack([np.bincount(i, minlength=60) for i in idx]).astype(float)
    got = weighted_auc(scores, y, counts)
    want = [roc_auc_score(y[i], scores[i]) for i in idx]
    assert got == pytest.approx(want, abs=1e-12)
    assert weighted_auc(scores, y, np.ones((1, 60)))[0] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert np.isnan(weighted_auc(scores, np.zeros(60, bool), np.ones((1, 60)))[0])


def test_identical_predictions_give_zero_and_a_zero_interval():
    labels, probs_a, _ = _runs()
    result = paired_bootstrap((probs_a, labels, None), (probs_a.copy(), labels, None), CLASSES, n_boot=200)
    assert result.difference == 0.0 and result.interval == (0.0, 0.0)
    assert set(result.per_class) == {"a", "b", "c"}  # d has no positive: left out
    assert all(c["interval"] == (0.0, 0.0) for c in result.per_class.values())


def test_point_estimate_is_sklearns_macro_difference_and_a_clear_gain_excludes_zero():
    labels, probs_a, probs_b = _runs(gap=1.5)
    result = paired_bootstrap((probs_a, labels, None), (probs_b, labels, None), CLASSES, n_boot=500, seed=3)
    defined = [0, 1, 2]
    auc = lambda p, c: roc_auc_score(labels[:, c], p[:, c])  # noqa: E731
    direct = np.mean([auc(probs_b, c) for c in defined]) - np.mean([auc(probs_a, c) for c in defined])
    assert result.difference == pytest.approx(direct, abs=1e-12)
    assert result.per_class["b"]["difference"] == pytest.approx(auc(probs_b, 1) - auc(probs_a, 1), abs=1e-12)
    assert 0.0 < result.interval[0] < result.difference < result.interval[1]
    assert result.replicates == 500
    again = paired_bootstrap((probs_a, labels, None), (probs_b, labels, None), CLASSES, n_boot=500, seed=3)
    assert again.interval == result.interval  # fixed seed
    # swapping the runs mirrors everything
    swapped = paired_bootstrap((probs_b, labels, None), (probs_a, labels, None), CLASSES, n_boot=500, seed=3)
    assert swapped.difference == pytest.approx(-result.difference)
    assert swapped.interval == pytest.approx((-result.interval[1], -result.interval[0]))


def test_interval_matches_a_plain_resampling_loop():
    """The vectorised bootstrap equals a loop that resamples indices and calls roc_auc_score."""
    labels, probs_a, probs_b = _runs(n=120, seed=5, gap=0.5)
    mask = np.random.default_rng(9).random(labels.shape) > 0.2
    n_boot = 40
    result = paired_bootstrap((probs_a, labels, mask), (probs_b, labels, mask), CLASSES, n_boot=n_boot, seed=11)
    rng = np.random.default_rng(11)
    idx_all = rng.integers(0, 120, size=(n_boot, 120))  # what the module draws for one chunk
    reps = []
    for idx in idx_all:
        diffs = []
        for c in range(4):
            keep = mask[idx, c]
            y = labels[idx, c][keep]
            if 0 < y.sum() < len(y):
                diffs.append(roc_auc_score(y, probs_b[idx, c][keep]) - roc_auc_score(y, probs_a[idx, c][keep]))
        reps.append(np.mean(diffs))
    assert result.interval == pytest.approx(tuple(np.percentile(reps, [2.5, 97.5])), abs=1e-12)


def test_pooled_over_seed_pairs_averages_the_pair_differences():
    pairs, single = [], []
    labels, _, _ = _runs(seed=0)
    for s in range(3):
        _, probs_a, probs_b = _runs(seed=10 + s, gap=0.6)
        pairs.append(((probs_a, labels, None), (probs_b, labels, None)))
        single.append(paired_bootstrap(*pairs[-1], CLASSES, n_boot=100).difference)
    pooled = pooled_bootstrap(pairs, CLASSES, n_boot=300)
    assert pooled.pairs == 3 and pooled.difference == pytest.approx(np.mean(single), abs=1e-12)
    assert pooled.interval[0] < pooled.difference < pooled.interval[1]
    # pooling three seeds narrows the interval against one pair alone
    one = paired_bootstrap(*pairs[0], CLASSES, n_boot=300)
    assert pooled.interval[1] - pooled.interval[0] < one.interval[1] - one.interval[0]


def test_runs_on_different_records_are_refused():
    labels, probs_a, probs_b = _runs()
    ids = np.array([f"CXR{i}" for i in range(len(labels))])
    with pytest.raises(UserError, match="different test records"):
        paired_bootstrap((probs_a, labels, None, ids), (probs_b, labels, None, ids[::-1]), CLASSES, n_boot=10)
    with pytest.raises(UserError, match="different test labels"):
        paired_bootstrap((probs_a, labels, None), (probs_b, 1 - labels, None), CLASSES, n_boot=10)
    with pytest.raises(UserError, match="different shapes"):
        paired_bootstrap((probs_a, labels, None), (probs_b[:10], labels[:10], None), CLASSES, n_boot=10)


def test_evaluated_classes_and_the_table():
    labels, probs_a, probs_b = _runs(gap=1.0)
    result = paired_bootstrap((probs_a, labels, None), (probs_b, labels, None), CLASSES, n_boot=100,
                              evaluated=["a", "b"])
    assert set(result.per_class) == {"a", "b"}
    text = format_comparison(result, "image_only", "vkd")
    lines = text.splitlines()
    assert "image_only" in lines[0] and "vkd" in lines[0] and "95% interval" in lines[0]
    assert lines[2].split()[0] == "a" and lines[3].split()[0] == "b"
    macro = lines[5].split()
    assert macro[:2] == ["Average", "(macro)"] and float(macro[4]) == pytest.approx(result.difference, abs=5e-4)
    assert "300 test records" in lines[6] and "100 of 100 replicates" in lines[6]
    with pytest.raises(UserError, match="not among"):
        paired_bootstrap((probs_a, labels, None), (probs_b, labels, None), CLASSES, n_boot=10, evaluated=["zzz"])
