"""The benchmark scripts run (a step or two each, on the CPU) and print what they promise.

Timings are not checked: only that each script works end to end and reports its figures.
"""

import re
import sys

import pytest
import torch

from benchmarks import bench_particles, bench_svi, gpu_smoke


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def run(monkeypatch, capsys, module, *argv) -> str:
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    module.main()
    return capsys.readouterr().out


def test_gpu_smoke_trains_the_paper_configuration_on_the_cpu(monkeypatch, capsys):
    out = run(monkeypatch, capsys, gpu_smoke, "--device", "cpu", "--steps", "1", "--warmup", "0",
              "--batch-size", "2", "--image-size", "32", "--tokens", "8")
    assert "DenseNet-121 at 32, z 512" in out and "text block width 384" in out
    rates = re.findall(r"amp (none|bf16):.* ([\d.]+) images/s", out)
    assert [amp for amp, _ in rates] == ["none", "bf16"] and all(float(r) > 0 for _, r in rates)
    assert "bf16 speed-up" in out


def test_svi_and_particle_benchmarks_print_their_tables(monkeypatch, capsys):
    out = run(monkeypatch, capsys, bench_svi, "--rounds", "1", "--per-round", "1", "--warmup", "0",
              "--particles", "2", "--threads", "1")
    row = out.strip().splitlines()[-1].split()
    assert row[0] == "2" and len(row) == 6 and all(float(x) > 0 for x in row[1:])
    out = run(monkeypatch, capsys, bench_svi, "--rounds", "1", "--per-round", "1", "--warmup", "0",
              "--particles", "1", "--threads", "1", "--unfused")
    row = out.strip().splitlines()[-1].split()
    assert "ratio unfused" in out and len(row) == 9 and all(float(x) > 0 for x in row[1:])
    out = run(monkeypatch, capsys, bench_svi, "--rounds", "1", "--per-round", "1", "--warmup", "0",
              "--particles", "2", "--threads", "1", "--bare")
    row = out.strip().splitlines()[-1].replace("[", " ").replace("]", " ").replace(",", " ").split()
    assert "bare/PyTorch" in out and row[0] == "2" and len(row) == 11 and all(float(x) > 0 for x in row[1:])
    share, low, high = (float(x) for x in row[7:10])  # Pyro/bare [95% CI]: one round, a point interval
    assert low <= share <= high
    out = run(monkeypatch, capsys, bench_svi, "--rounds", "1", "--per-round", "1", "--warmup", "0",
              "--threads", "1", "--whole-step", "--bare")
    line = out.strip().splitlines()[-1]
    assert line.startswith("whole demo step (L = M = 1)")
    values = line.split(")", 1)[1].replace("[", " ").replace("]", " ").replace(",", " ").split()
    assert len(values) == 8 and all(float(x) > 0 for x in values)
    out = run(monkeypatch, capsys, bench_particles, "--rounds", "1", "--per-round", "1", "--warmup", "0",
              "--particles", "1", "2", "--threads", "1")
    rows = [line.split() for line in out.strip().splitlines()[-2:]]
    assert [r[0] for r in rows] == ["1", "2"] and all(len(r) == 7 for r in rows)


def test_text_store_benchmark_prints_one_line_per_size(monkeypatch, capsys):
    from benchmarks import bench_text_store

    out = run(monkeypatch, capsys, bench_text_store, "--reports", "40,90", "--width", "8", "--batches", "3",
              "--batch-size", "4", "--chunk", "32")
    lines = [line for line in out.strip().splitlines() if not line.startswith("#")]
    pattern = r"reports=(\d+) peak_rss_mb=([\d.]+) write_mb_s=([\d.]+) read_batches_s=([\d.]+)"
    matches = [re.fullmatch(pattern, line) for line in lines]
    assert all(matches) and [int(m.group(1)) for m in matches] == [40, 90]
    assert all(float(x) > 0 for m in matches for x in m.groups()[1:])


def fake_sweep(root, name, quality, seeds=(0, 1), cells=((0.0, 1.0), (0.5, 0.3)), teacher=None, active=None):
    """A sweep folder as benchmarks/regimes.sh leaves it: runs/<name>/ with config.yaml, metrics.json,
    predictions_test.npz (probabilities `quality` * label + noise) and sweep_run.json."""
    import json

    import numpy as np
    import yaml
    from sklearn.metrics import roc_auc_score

    from vkd_pyro.classes import CLASSES
    from vkd_pyro.training.predictions import write_predictions

    aucs = {}
    for cell in cells:
        d, r, f = cell if len(cell) == 3 else (cell[0], 0.0, cell[1])  # (d, f) or (d, label noise, f)
        labels = np.random.default_rng(7).random((60, len(CLASSES))) < 0.3  # the same test records everywhere
        for seed in seeds:
            folder = root / name / "runs" / f"data.difficulty={d},data.label_noise={r},data.train_fraction={f}-seed{seed}"
            folder.mkdir(parents=True)
            noise = np.random.default_rng([seed, int(quality * 100), int(d * 10), int(r * 10)]).random(labels.shape)
            probs = np.clip(quality * labels + (1 - quality) * noise, 0, 1)
            macro = float(np.mean([roc_auc_score(labels[:, c], probs[:, c]) for c in range(len(CLASSES))]))
            aucs[(*cell, seed)] = macro
            data = {"difficulty": d, "train_fraction": f, **({"label_noise": r} if len(cell) == 3 else {})}
            (folder / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "data": data}))
            metrics = {"macro_auc": macro, "val_macro_auc": macro - 0.01}
            if teacher is not None:
                metrics["teacher"] = {"macro_auc": teacher, "nll": 2.5}
            (folder / "metrics.json").write_text(json.dumps(metrics))
            (folder / "sweep_run.json").write_text(json.dumps({"elbo": {"kl": 0.3}, "active_units": active}))
            write_predictions(folder, "test", probs, labels.astype(np.float32), CLASSES,
                              record_ids=[f"r{i}" for i in range(len(labels))])
    return aucs


def test_regime_map_tabulates_the_differences_and_the_report_branch(tmp_path, monkeypatch, capsys):
    from benchmarks import regime_map

    base = fake_sweep(tmp_path, "image_only", 0.2)
    better = fake_sweep(tmp_path, "vkd", 0.5, teacher=0.9, active=3)
    fake_sweep(tmp_path, "vkd_free_bits", 0.2, seeds=(0,), cells=((0.0, 1.0),), teacher=0.8, active=7)
    png = tmp_path / "regimes.png"
    out = run(monkeypatch, capsys, regime_map, str(tmp_path), "--png", str(png), "--boot", "200")
    rows = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| 0")]
    wide, branch = rows[:2], rows[2:]
    assert wide[0][:2] == ["0", "1"] and wide[1][:2] == ["0.5", "0.3"]
    header = next(line for line in out.splitlines() if line.startswith("| difficulty"))
    assert "VKD (Eq. 8) - image only [95% CI]" in header and "vkd_free_bits - image only [95% CI]" in header
    # vkd minus image only: the mean over seeds of the macro-AUC differences, an interval above 0
    for row, cell in zip(wide, [(0.0, 1.0), (0.5, 0.3)]):
        expected = sum(better[(*cell, s)] - base[(*cell, s)] for s in (0, 1)) / 2
        value, interval = row[4].split(" [")
        assert float(value) == pytest.approx(expected, abs=1e-3) and row[4].endswith("(n=2) *")
        low, high = (float(x) for x in interval.split("]")[0].split(", "))
        assert 0 < low < expected < high
    assert wide[1][5:7] == ["-", "-"]  # the remedy ran one cell only
    assert [r[2] for r in branch] == ["image only", "VKD (Eq. 8)", "vkd_free_bits", "image only", "VKD (Eq. 8)"]
    vkd = branch[1]
    assert vkd[3] == "2" and vkd[6:] == ["0.900 ± 0.000", "2.500 ± 0.000", "0.300 ± 0.000", "3.0 ± 0.0"]
    assert branch[2][9] == "7.0" and branch[0][6:] == ["-"] * 4  # image only has no teacher
    assert png.stat().st_size > 1000


def test_regime_map_ii_reads_label_noise_controls_seed_ranges_and_levels(tmp_path, monkeypatch, capsys):
    from benchmarks import regime_map

    cells = ((0.5, 0.0, 0.3), (0.5, 0.4, 0.3))
    base = fake_sweep(tmp_path, "image_only", 0.2, seeds=(0, 1, 2), cells=cells)
    kd = fake_sweep(tmp_path, "kd", 0.5, seeds=(0, 1, 2), cells=cells)
    taught = fake_sweep(tmp_path, "text_only", 0.6, seeds=(0, 1, 2), cells=cells, teacher=0.9)
    shuffled = fake_sweep(tmp_path, "kd_shuffled", 0.3, seeds=(0, 1, 2), cells=cells[1:])
    chance = fake_sweep(tmp_path, "text_only_shuffled", 0.1, seeds=(0, 1, 2), cells=cells[1:], teacher=0.55)
    out = run(monkeypatch, capsys, regime_map, str(tmp_path), "--boot", "200", "--seeds", "1-2")
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("| difficulty"))
    assert header.startswith("| difficulty | label noise | train fraction | image only | KD (Hinton)")
    assert "teacher (text only) AUC | teacher NLL" in header and "shuffled" not in header
    wide = [line.strip("| ").split(" | ") for line in lines if line.startswith("| 0.5 |")][:2]
    assert [row[:3] for row in wide] == [["0.5", "0", "0.3"], ["0.5", "0.4", "0.3"]]
    expected = sum(kd[(*cells[1], s)] - base[(*cells[1], s)] for s in (1, 2)) / 2  # seeds 1 and 2 only
    assert float(wide[1][5].split(" [")[0]) == pytest.approx(expected, abs=1e-3) and "(n=2)" in wide[1][5]
    assert wide[1][6].startswith(f"{(taught[(*cells[1], 1)] + taught[(*cells[1], 2)]) / 2:.3f} ± ")
    assert wide[1][7] == "2.500 ± 0.000"  # the text_only runs' own AUC and their teacher block's NLL
    control = next(line.strip("| ").split(" | ") for line in lines if "| KD (Hinton) | shuffled |" in line)
    assert control[:5] == ["0.5", "0.4", "0.3", "KD (Hinton)", "shuffled"]
    to_true = sum(shuffled[(*cells[1], s)] - kd[(*cells[1], s)] for s in (1, 2)) / 2
    assert float(control[7].split(" [")[0]) == pytest.approx(to_true, abs=1e-3)
    assert control[8].startswith(f"{(chance[(*cells[1], 1)] + chance[(*cells[1], 2)]) / 2:.3f} ± ")
    # a wider interval at a Bonferroni level
    wider = run(monkeypatch, capsys, regime_map, str(tmp_path), "--boot", "400", "--level", str(1 - 0.05 / 18))
    assert "99.72% CI" in wider


def test_paired_ratio_is_the_median_per_round_ratio_with_an_interval_around_it():
    from benchmarks.common import paired_ratio

    assert paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == (2.0, 2.0, 2.0)  # load moves both sides alike
    share, low, high = paired_ratio([1.0, 1.1, 1.2, 1.3, 1.4], [1.0] * 5)
    assert share == pytest.approx(1.2) and 1.0 <= low <= share <= high <= 1.4
