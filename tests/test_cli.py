"""End to end through the CLI on a tiny config: train, evaluate, predict, render, and user mistakes."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vkd_pyro
from tests.tiny_runs import tiny_overrides
from vkd_pyro.classes import CLASSES
from vkd_pyro.cli import main

TINY = tiny_overrides({"model.hidden": "[32]", "train.max_epochs": 2, "inference.test_samples": 4})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    out = root / "run"
    code = main(["train", "--config", "configs/demo.yaml", "--out", str(out), f"cache_dir={root / 'cache'}", *TINY])
    assert code == 0
    return out


def test_train_writes_the_run_folder(run_dir, capsys):
    for name in ["config.yaml", "checkpoint.pt", "history.csv", "metrics.json", "roc.png"]:
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["classes"] == list(CLASSES)
    assert set(metrics["auc"]) == set(CLASSES)
    assert all(v is None or 0.0 <= v <= 1.0 for v in metrics["auc"].values())
    assert metrics["objective"] == "vkd" and metrics["mc"] == {"L": 1, "M": 1, "S": 4}
    assert metrics["n_test"] == 12 and 0.0 <= metrics["macro_auc"] <= 1.0 and "micro_auc" in metrics
    defined = [v for v in metrics["auc"].values() if v is not None]
    assert metrics["macro_auc"] == pytest.approx(sum(defined) / len(defined))
    with open(run_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "beta", "loss", "image_nll", "text_nll", "kl", "val_macro_auc", "seconds"]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for r in rows:  # the recorded terms add up to the loss up to the Monte Carlo KL
        assert float(r["loss"]) == pytest.approx(float(r["image_nll"]) + float(r["text_nll"])
                                                 + float(r["beta"]) * float(r["kl"]), rel=0.5)


def test_evaluate_recomputes_metrics(run_dir, capsys):
    before = json.loads((run_dir / "metrics.json").read_text())
    assert main(["evaluate", "--run", str(run_dir), "--samples", "4"]) == 0
    after = json.loads((run_dir / "metrics.json").read_text())
    assert after["n_test"] == before["n_test"] and after["mc"]["S"] == 4
    assert "Average (macro)" in capsys.readouterr().out


def test_predict_from_images_alone(run_dir, tmp_path, capsys):
    paths = []
    for i in range(2):
        path = tmp_path / f"x{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (50, 40), dtype=np.uint8)).save(path)
        paths.append(str(path))
    assert main(["predict", "--run", str(run_dir), "--samples", "8", "--json", *paths]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["image"] for o in out] == paths
    for o in out:
        assert set(o["probability"]) == set(CLASSES)
        assert all(0 <= p <= 1 for p in o["probability"].values())
        assert all(s >= 0 for s in o["std"].values())


def test_render_writes_a_contact_sheet(tmp_path, capsys):
    out = tmp_path / "sheet.png"
    assert main(["render", "--config", "configs/demo.yaml", "--out", str(out), "--count", "6",
                 "data.image_size=32", f"cache_dir={tmp_path}"]) == 0
    assert Image.open(out).size[0] > 100


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "nope.yaml"], "nope.yaml: config file not found"),
    (["train", "--config", "configs/demo.yaml", "model.zdim=3"], "configs/demo.yaml: model.zdim: unknown key"),
    (["train", "--config", "configs/demo.yaml", "inference.prior_samples=0"], "inference.prior_samples: 0 must be > 0"),
    (["evaluate", "--run", "no/such/run"], "no/such/run: run folder not found"),
])
def test_user_mistakes_give_one_line_and_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_overrides_may_follow_flags(capsys):
    argv = ["train", "--config", "configs/demo.yaml", "--no-progress", "model.zdim=3"]
    assert main(argv) == 2  # the override reached the config (and was refused there)
    assert "model.zdim: unknown key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "configs/demo.yaml", "--bogus"])
    assert exit_info.value.code == 2


def test_predict_on_a_missing_image(run_dir, capsys):
    assert main(["predict", "--run", str(run_dir), "missing.png"]) == 2
    assert "missing.png: image not found" in capsys.readouterr().err


REAL = Path(__file__).resolve().parents[2] / "shared" / "real-radiographs" / "nih_00027426_000.png"


@pytest.fixture
def bit_depths(tmp_path):
    """The real NIH radiograph as an 8-bit PNG and as a 12-bit radiograph stored in a 16-bit PNG."""
    if not REAL.is_file():
        pytest.skip(f"{REAL} is missing (the real radiograph sits in ../shared/real-radiographs beside the repo)")
    folder = tmp_path / "xrays"
    folder.mkdir()
    grey = np.asarray(Image.open(REAL).convert("L"))
    Image.fromarray(grey).save(folder / "eight.png")
    twelve = (grey.astype(np.uint16) * 4095 // 255).astype(np.uint16)  # 12 bits of 16
    Image.fromarray(twelve).save(folder / "sixteen.png")
    assert Image.open(folder / "sixteen.png").mode.startswith("I")
    return folder


def test_a_16_bit_png_predicts_as_its_8_bit_rendering(run_dir, bit_depths, tmp_path, capsys):
    """Through `vkd-pyro predict FOLDER --csv` and through load_run(...).predict: the same prediction
    within Monte Carlo noise (S = 400 prior samples: the spread of a mean is std / 20)."""
    out = tmp_path / "out.csv"
    assert main(["predict", "--run", str(run_dir), "--samples", "400", "--device", "cpu", str(bit_depths),
                 "--csv", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [Path(r["image"]).name for r in rows] == ["eight.png", "sixteen.png"]  # one row per image
    assert set(rows[0]) == {"image"} | set(CLASSES) | {f"{c} std" for c in CLASSES}
    for c in CLASSES:
        p8, p16 = float(rows[0][c]), float(rows[1][c])
        noise = (float(rows[0][f"{c} std"]) + float(rows[1][f"{c} std"])) / 20
        assert abs(p8 - p16) <= 4 * noise + 0.01, c
    prediction = vkd_pyro.load_run(run_dir).predict(str(bit_depths / "*.png"), samples=400)
    assert [Path(p).name for p in prediction.images] == ["eight.png", "sixteen.png"]
    gap = np.abs(prediction.probability[0] - prediction.probability[1])
    assert (gap <= 4 * prediction.std.mean(0) / 20 + 0.01).all()


def test_help_and_a_mistyped_option_answer_without_loading_torch():
    """The parser (vkd_pyro.cli.parser) imports argparse only; a command's module is loaded after parsing."""
    import subprocess
    import sys

    from vkd_pyro.cli.parser import HANDLERS, build_parser

    script = ("import sys\nfrom vkd_pyro.cli import main\n"
              "for argv in [['--help']] + [[c, '--help'] for c in %r] + [['train', '--no-such-option']]:\n"
              "    try:\n        main(argv)\n    except SystemExit as exit:\n        assert exit.code in (0, 2), exit.code\n"
              "print(sorted(m for m in ('torch', 'pyro', 'transformers', 'pandas', 'matplotlib') if m in sys.modules))\n"
              % (sorted(HANDLERS),))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "unrecognized arguments: --no-such-option" in out.stderr
    assert set(build_parser()._subparsers._group_actions[0].choices) == set(HANDLERS)  # every command has a handler
    for name, handler in HANDLERS.items():  # and every handler exists
        module, function = handler.split(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function)), name
