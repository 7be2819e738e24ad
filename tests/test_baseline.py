"""sweep.md and table2.md: each row's macro-AUC difference to a baseline row, with its 95% interval
(pooled paired bootstrap over the seeds both have), from the runs' predictions_test.npz."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from vkd_pyro.analysis.ablate import format_table, table_axis
from vkd_pyro.analysis.compare import pooled_bootstrap
from vkd_pyro.analysis.grid import Axis, PlannedRun, parse_baseline, run_name
from vkd_pyro.analysis.sweep_tables import baseline_differences, write_outputs
from vkd_pyro.classes import CLASSES
from vkd_pyro.config import config_from_dict, save_config
from vkd_pyro.errors import UserError
from vkd_pyro.training.predictions import write_predictions

N, C = 120, len(CLASSES)
RNG = np.random.default_rng(0)
LABELS = (RNG.random((N, C)) < 0.3).astype(np.float32)
SKILL = {"image_only": 1.5, "vkd": 0.8, "no_mi": 0.5}


def probs_for(objective: str, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed * 10 + len(objective)).normal(size=(N, C))
    return 1 / (1 + np.exp(-(SKILL[objective] * (2 * LABELS - 1) + noise)))


def make_runs(root, axis, seeds, missing=()):
    runs = []
    for text in axis.texts:
        for seed in seeds:
            if (text, seed) in missing:
                continue
            name = run_name({axis.key: text}, seed)
            folder = root / "runs" / name
            probs = probs_for(text, seed)
            write_predictions(folder, "test", probs, LABELS, CLASSES, meta={"seed": seed, "objective": text})
            save_config(config_from_dict({}, overrides=[f"{axis.key}={text}", f"seed={seed}"]), folder / "config.yaml")
            macro = np.mean([roc_auc_score(LABELS[:, c], probs[:, c]) for c in range(C)])
            (folder / "metrics.json").write_text(json.dumps({"macro_auc": macro, "micro_auc": macro}))
            runs.append(PlannedRun(name, {axis.key: text}, seed, [], folder))
    return runs


def hand_difference(objective, seeds, base="image_only"):
    """Mean over seeds of macro AUC(row) - macro AUC(baseline), by scikit-learn."""
    def macro(p):
        return np.mean([roc_auc_score(LABELS[:, c], p[:, c]) for c in range(C)])
    return float(np.mean([macro(probs_for(objective, s)) - macro(probs_for(base, s)) for s in seeds]))


def test_sweep_md_has_each_rows_difference_to_the_baseline(tmp_path):
    axis = table_axis(2)
    runs = make_runs(tmp_path, axis, [0, 1, 2], missing={("no_mi", 2)})
    baseline = parse_baseline("inference.objective=image_only", [axis])
    rows = write_outputs(runs, [axis], tmp_path, "t", plot=False, baseline=baseline)
    differences = baseline_differences(rows, [axis], tmp_path / "runs", baseline)
    assert set(differences) == {("vkd",), ("no_mi",)}
    assert differences[("vkd",)].difference == pytest.approx(hand_difference("vkd", [0, 1, 2]), abs=1e-9)
    assert differences[("no_mi",)].difference == pytest.approx(hand_difference("no_mi", [0, 1]), abs=1e-9)
    assert differences[("no_mi",)].pairs == 2  # matching seeds only
    low, high = differences[("vkd",)].interval
    assert low < differences[("vkd",)].difference < high < 0  # image_only is the better one here
    text = (tmp_path / "sweep.md").read_text()
    assert "Δ macro AUC [95% CI]" in text and "| image_only | 3 |" in text and "baseline" in text
    vkd = differences[("vkd",)]
    assert f"{vkd.difference:+.3f} [{vkd.interval[0]:+.3f}, {vkd.interval[1]:+.3f}]" in text
    pairs = [((probs_for("image_only", s), LABELS, None), (probs_for("vkd", s), LABELS, None)) for s in (0, 1, 2)]
    assert pooled_bootstrap(pairs, CLASSES).interval == pytest.approx(vkd.interval)


def test_table2_compares_with_image_only(tmp_path):
    axis = table_axis(2)
    runs = make_runs(tmp_path, axis, [0, 1])
    rows = write_outputs(runs, [axis], tmp_path, "t", plot=False)
    differences = baseline_differences(rows, [axis], tmp_path / "runs", {axis.key: "image_only"})
    text = format_table(2, rows, axis, "openi_phantom", 2, differences)
    assert "Δ vs image_only [95% CI]" in text
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "| baseline |" in lines["w/o VKD (no EHR)"]
    assert f"{differences[('vkd',)].difference:+.3f} [" in lines["Full architecture"]
    assert "Δ" not in format_table(3, [], table_axis(3), "openi_phantom", 2)  # Table 3 has no baseline


def test_bad_baselines_are_one_line_user_errors():
    axes = [Axis("inference.objective", ["vkd", "image_only"]), Axis("model.z_dim", ["16", "32"])]
    assert parse_baseline("inference.objective=vkd,model.z_dim=16", axes) == {
        "inference.objective": "vkd", "model.z_dim": "16"}
    assert parse_baseline(None, axes) is None
    for spec, message in [("seed=1", "seed is not a grid key"), ("inference.objective=kd", "is not in the grid"),
                          ("inference.objective=vkd", "name a value of model.z_dim too"), ("vkd", "write key=value")]:
        with pytest.raises(UserError, match=rf"^--baseline {spec}: .*{message}"):
            parse_baseline(spec, axes)
