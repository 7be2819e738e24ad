"""Sweeps, the Table 2 ablation, diagnose and figures end to end through the CLI, on a tiny config."""

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

import vkd_pyro.analysis.sweep
from tests.tiny_runs import tiny_overrides
from vkd_pyro.analysis.grid import parse_grid, run_name, split_values
from vkd_pyro.cli import main

TINY = tiny_overrides()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def count_fits(monkeypatch):
    """Count the calls of the sweep's training function (vkd_pyro.training.loop.fit)."""
    calls = []
    real = vkd_pyro.analysis.sweep.train_fit

    def counting(config, out_dir, progress=None, **options):
        calls.append((str(out_dir), options.get("resume", False)))
        return real(config, out_dir, progress, **options)

    monkeypatch.setattr(vkd_pyro.analysis.sweep, "train_fit", counting)
    return calls


@pytest.fixture(scope="module")
def table2(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("ablate")
    code = main(["ablate", "--config", "configs/demo.yaml", "--table", "2", "--seeds", "1", "--out", str(out),
                 f"cache_dir={cache}", "train.tensorboard=true", *TINY])
    assert code == 0
    return out


def test_grid_parsing():
    assert split_values("1,4,16") == ["1", "4", "16"]
    assert split_values("[16,16],[32]") == ["[16,16]", "[32]"]
    axes = parse_grid(["inference.num_particles=1,4", "model.hidden=[16,16],[32]"])
    assert [a.key for a in axes] == ["inference.num_particles", "model.hidden"]
    assert axes[0].values == [1, 4] and axes[1].values == [[16, 16], [32]]
    assert run_name({"a.b": "1", "model.hidden": "[16,16]"}, 3) == "a.b=1,model.hidden=16_16-seed3"
    assert main(["sweep", "--config", "configs/demo.yaml", "--grid", "seed=1,2", "--out", "unused"]) == 2
    assert main(["sweep", "--config", "configs/demo.yaml", "--grid", "model.no_such_key=1,2", "--out", "unused"]) == 2


@pytest.mark.parametrize("command", [["sweep", "--grid", "inference.num_particles=1"], ["ablate", "--table", "2"]])
def test_zero_seeds_is_a_one_line_error_before_any_run(command, tmp_path, count_fits, capsys):
    code = main([*command, "--config", "configs/demo.yaml", "--seeds", "0", "--out", str(tmp_path / "out"), *TINY])
    assert code == 2 and count_fits == []
    assert "--seeds: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()


def test_sweep_writes_tables_and_skips_finished_runs(tmp_path, cache, count_fits, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--config", "configs/demo.yaml", "--grid", "inference.prior_samples=1,2",
            "--grid", "inference.num_particles=1", "--seeds", "1", "--out", str(out), f"cache_dir={cache}", *TINY]
    assert main(args) == 0
    assert len(count_fits) == 2
    names = ["inference.prior_samples=1,inference.num_particles=1-seed0",
             "inference.prior_samples=2,inference.num_particles=1-seed0"]
    for name in names:  # ordinary run folders
        for file in ["config.yaml", "checkpoint.pt", "history.csv", "metrics.json", "sweep_run.json"]:
            assert (out / "runs" / name / file).is_file(), (name, file)
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == names
    assert [r["inference.prior_samples"] for r in rows] == ["1", "2"] and {r["seed"] for r in rows} == {"0"}
    for r in rows:
        assert 0.0 <= float(r["macro_auc"]) <= 1.0
        assert float(r["loss"]) > 0 and float(r["image_nll"]) > 0 and float(r["text_nll"]) > 0 and float(r["kl"]) >= 0
        assert float(r["log_lik"]) < 0 and 0.0 <= float(r["ece"]) <= 1.0
        assert float(r["wall_seconds"]) > 0 and float(r["steps_per_second"]) > 0
        metrics = json.loads((out / "runs" / r["run"] / "metrics.json").read_text())
        assert float(r["macro_auc"]) == pytest.approx(metrics["macro_auc"], abs=1e-5)
        assert metrics["mc"]["M"] == int(r["inference.prior_samples"])
        assert float(r["teacher_auc"]) == pytest.approx(metrics["teacher"]["macro_auc"], abs=1e-5)
        summary = json.loads((out / "runs" / r["run"] / "sweep_run.json").read_text())
        assert summary["z_dim"] == 16 and 0 <= summary["active_units"] <= 16
        assert float(r["active_units"]) == summary["active_units"]
    table = (out / "sweep.md").read_text()
    assert "| inference.prior_samples | inference.num_particles | seeds | macro AUC |" in table
    assert table.count("\n| 1 | 1 | 1 |") == 1 and table.count("\n| 2 | 1 | 1 |") == 1
    cells = [len(line.replace("\\|", "").split("|")) for line in table.splitlines() if line.startswith("|")]
    assert len(cells) == 4 and len(set(cells)) == 1  # header, rule, two rows: as many cells each
    with Image.open(out / "sweep.png") as image:
        assert image.size[0] > 400 and image.size[1] > 200

    stamps = {n: (out / "runs" / n / "metrics.json").stat().st_mtime_ns for n in names}
    assert main(args) == 0  # again: nothing to train
    assert len(count_fits) == 2
    assert stamps == {n: (out / "runs" / n / "metrics.json").stat().st_mtime_ns for n in names}
    assert "finished before, skipped" in capsys.readouterr().out
    with open(out / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 2

    (out / "runs" / names[1] / "metrics.json").unlink()  # as if interrupted during that run
    (out / "runs" / names[1] / "sweep_run.json").unlink()
    assert main(args) == 0
    resumable = (out / "runs" / names[1] / "last.pt").is_file()  # the resume state, where training writes one
    assert count_fits[2:] == [(str(out / "runs" / names[1]), resumable)]
    assert (out / "runs" / names[1] / "metrics.json").is_file()
    with open(out / "sweep.csv") as f:
        assert [r["run"] for r in csv.DictReader(f)] == names


def test_ablate_table2_has_the_three_rows_and_the_papers_column(table2, capsys):
    text = (table2 / "table2.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert "OpenI (paper)" in rows[""] and "MIMIC-CXR (paper)" in rows[""] and "openi_phantom" in rows[""][0]
    expected = {"Full architecture": ("0.885", "0.839"), "w/o L_MI (Eq. 7)": ("0.873", "0.832"),
                "w/o VKD (no EHR)": ("0.837", "0.807")}
    assert set(rows) - {""} == set(expected)
    for label, paper in expected.items():
        ours, n, difference, openi, mimic = rows[label]
        assert 0.0 <= float(ours) <= 1.0 and n == "1" and (openi, mimic) == paper
        # the difference to image_only with its 95% interval (tests/test_baseline.py pins its value)
        assert (difference == "baseline" if label == "w/o VKD (no EHR)"
                else re.fullmatch(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", difference)), difference
    assert "quote van Sonsbeek et al." in text
    with open(table2 / "sweep.csv") as f:
        objectives = [r["inference.objective"] for r in csv.DictReader(f)]
    assert objectives == ["vkd", "no_mi", "image_only"]
    for objective in objectives:
        assert (table2 / "runs" / f"inference.objective={objective}-seed0" / "metrics.json").is_file()


def test_training_writes_the_step_terms_to_tensorboard(table2):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = table2 / "runs" / "inference.objective=vkd-seed0"
    steps = json.loads((run / "metrics.json").read_text())["train_steps"]
    assert steps == 3  # 42 training records in batches of 16, one epoch
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for term in ["loss", "image_nll", "text_nll", "kl", "beta"]:
        assert [s.step for s in events.Scalars(f"step/{term}")] == [1, 2, 3]
    assert [s.step for s in events.Scalars("epoch/loss")] == [1]


def test_diagnose_writes_diagnostics_json(table2, capsys):
    vkd = table2 / "runs" / "inference.objective=vkd-seed0"
    assert main(["diagnose", "--run", str(vkd), "--samples", "16"]) == 0
    result = json.loads((vkd / "diagnostics.json").read_text())
    assert result["n"] == 12 and result["objective"] == "vkd"
    assert result["elbo"]["beta"] == 1.0 and result["elbo"]["text_nll"] > 0 and result["elbo"]["kl"] > 0
    lik = result["log_p_y_given_x"]
    assert lik["K"] == 16 and lik["prior_proposal"] < 0 and lik["guide_proposal"] < 0
    assert 0.0 <= result["calibration"]["ece"] <= 1.0 and result["calibration"]["pairs"] == 12 * 14
    latent = result["latent"]
    assert latent["z_dim"] == 16 and 0 <= latent["guide_active_units"] <= 16 and 0 <= latent["prior_active_units"] <= 16
    assert len(latent["kl_per_dim"]) == 16 and latent["kl_total"] == pytest.approx(sum(latent["kl_per_dim"]))
    assert latent["kl_total"] == pytest.approx(result["elbo"]["kl"], rel=1e-4)  # the analytic KL, same records
    # the sweep's active-unit column counts the same test reports
    assert json.loads((vkd / "sweep_run.json").read_text())["active_units"] == latent["guide_active_units"]
    assert "active units" in capsys.readouterr().out

    image_only = table2 / "runs" / "inference.objective=image_only-seed0"
    assert main(["diagnose", "--run", str(image_only), "--samples", "16", "--split", "validation"]) == 0
    result = json.loads((image_only / "diagnostics_validation.json").read_text())
    assert result["elbo"]["loss"] == pytest.approx(result["elbo"]["image_nll"])
    assert "kl" not in result["elbo"] and "text_nll" not in result["elbo"]  # image_only records its own terms
    assert "guide_proposal" not in result["log_p_y_given_x"] and "guide_active_units" not in result["latent"]


def test_figures_writes_the_papers_figures(table2):
    vkd = table2 / "runs" / "inference.objective=vkd-seed0"
    image_only = table2 / "runs" / "inference.objective=image_only-seed0"
    assert main(["figures", "--run", str(vkd), "--compare", str(image_only), "--records", "2"]) == 0
    figures = vkd / "figures"
    for name in ["tsne.png", "roc.png", "reliability.png", "training_curves.png", "latent_units.png"]:
        with Image.open(figures / name) as image:
            assert image.size[0] > 300 and np.asarray(image.convert("L")).std() > 5, name  # not blank
    records = json.loads((figures / "attention.json").read_text())
    assert len(records) == 2
    for record in records:
        assert (figures / record["figure"]).is_file()
        assert len(record["words"]) == len(record["weights"]) > 5
        assert not any(w.startswith("##") or w in ("[CLS]", "[SEP]") for w in record["words"])
        assert all(w > 0 for w in record["weights"]) and record["predicted"] != "No Finding"
    with Image.open(figures / "tsne.png") as image:
        assert image.size[0] > 1.6 * image.size[1]  # two panels side by side
    # An image-only run has no report branch: Grad-CAM only, and its t-SNE alone.
    assert main(["figures", "--run", str(image_only), "--records", "1"]) == 0
    assert json.loads((image_only / "figures" / "attention.json").read_text())[0]["weights"] is None
