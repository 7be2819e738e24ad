"""The Python API (`vkd_pyro.load_run`) and the installed layout, as a user meets them.

From a folder that holds its own `models/` and `guides/` packages (the most common folder names in
ML projects), `python -m vkd_pyro train` and the README's Python example run as they are; nothing
named `models` or `guides` is importable from site-packages.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vkd_pyro
from tests.tiny_runs import tiny_overrides
from vkd_pyro.classes import CLASSES
from vkd_pyro.cli import main
from vkd_pyro.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
SHADOW = 'raise ImportError("the user\'s own {name} package was imported by vkd-pyro")\n'


def python(args, cwd, **kwargs):
    """A Python process as a user starts it: cwd on sys.path first, the repository not."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A user's project folder with its own models/ and guides/ packages, a tiny trained run, images."""
    root = tmp_path_factory.mktemp("project")
    for name in ("models", "guides"):
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(SHADOW.format(name=name))
    out = python(["-m", "vkd_pyro", "train", "--config", str(REPO / "configs" / "demo.yaml"), "--out", "runs/tiny",
                  f"cache_dir={root / 'cache'}", *tiny_overrides()], cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 40), dtype=np.uint8)).save(images / f"x{i}.png")
    return root


def test_nothing_named_models_or_guides_is_installed(tmp_path):
    out = python(["-c", "import importlib.util as u; print(u.find_spec('models'), u.find_spec('guides'))"],
                 cwd=tmp_path)
    assert out.stdout.split() == ["None", "None"]
    out = python(["-c", "import vkd_pyro.models, vkd_pyro.guides; print(vkd_pyro.models.__name__)"], cwd=tmp_path)
    assert out.stdout.strip() == "vkd_pyro.models", out.stderr


def test_train_from_a_folder_with_its_own_models_and_guides(project):
    assert (project / "runs" / "tiny" / "metrics.json").is_file()


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs(project):
    code = readme_example()
    assert 'load_run("runs/demo"' in code and '"images/"' in code
    code = code.replace('"runs/demo"', '"runs/tiny"')
    out = python(["-c", code], cwd=project, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert any(line.startswith("images/x0.png") for line in lines)
    assert any(line.startswith("macro AUC") for line in lines)
    assert lines[-1] == "torch.Size([8, 4, 14])"


def test_load_run_predict_and_evaluate(project):
    run = vkd_pyro.load_run(project / "runs" / "tiny", device="cpu")
    assert run.device == torch.device("cpu") and run.model is run.module.model and run.guide is run.module.guide
    size = run.config.data.image_size
    images = torch.rand(5, 1, size, size)
    torch.manual_seed(0)
    by_tensor = run.predict(images, samples=64)
    assert by_tensor.probability.shape == (5, len(CLASSES)) == by_tensor.std.shape
    assert ((0 <= by_tensor.probability) & (by_tensor.probability <= 1)).all() and (by_tensor.std >= 0).all()
    # the probability is the mean of S Monte Carlo draws: a second run agrees within their spread
    torch.manual_seed(1)
    again = run.predict(images[:, 0], samples=64)  # (B, H, W) works too
    assert np.abs(again.probability - by_tensor.probability).max() <= 4 * by_tensor.std.max() / 8 + 1e-6
    by_files = run.predict(str(project / "images" / "*.png"), samples=4)
    assert [Path(p).name for p in by_files.images] == ["x0.png", "x1.png", "x2.png"]
    metrics = run.evaluate("test", samples=2)
    written = json.loads((project / "runs" / "tiny" / "metrics.json").read_text())
    assert metrics["n_test"] == written["n_test"] and set(metrics["auc"]) == set(CLASSES)
    assert metrics["classes"] == written["classes"] and metrics["objective"] == written["objective"]


def test_a_run_saved_from_another_device_loads_on_the_cpu(project, tmp_path):
    """A run trained on a GPU says `device: cuda` in its config.yaml; load_run(device="cpu") does not
    ask for a GPU, and the checkpoint's tensors are read to the CPU first (map_location)."""
    copy = tmp_path / "gpu-run"
    shutil.copytree(project / "runs" / "tiny", copy)
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace("device: cpu", "device: cuda"))
    run = vkd_pyro.load_run(copy, device="cpu")  # the run's own device (cuda) is not asked for
    assert run.config.device == "cpu" and next(run.module.parameters()).device.type == "cpu"


def test_api_mistakes_are_user_errors(project):
    run = vkd_pyro.load_run(project / "runs" / "tiny")
    with pytest.raises(UserError, match="no file matches the pattern"):
        run.predict(str(project / "nothing-*.png"))
    with pytest.raises(UserError, match="run folder not found"):
        vkd_pyro.load_run(project / "nowhere")


def test_train_returns_a_run_whose_evaluation_is_metrics_json(tmp_path_factory, capsys):
    """`vkd_pyro.train` trains as the CLI does and returns the Run; `Run.evaluate("test")` and `vkd-pyro
    evaluate --run` give metrics.json's figures exactly (the S test draws are seeded by the run's seed),
    and another seed gives fresh draws."""
    torch.set_num_threads(1)
    cache = tmp_path_factory.getbasetemp() / "objectives-cache"
    out = tmp_path_factory.mktemp("api") / "run"
    overrides = dict(text.split("=", 1) for text in tiny_overrides({"train.max_epochs": 2}))
    run = vkd_pyro.train(REPO / "configs" / "demo.yaml", out=out, cache_dir=str(cache),
                         **{key.replace(".", "__"): value for key, value in overrides.items()})
    assert isinstance(run, vkd_pyro.Run) and run.folder == out and run.config.train.max_epochs == 2
    written = json.loads((out / "metrics.json").read_text())
    figures = ("auc", "macro_auc", "micro_auc", "positives", "teacher", "n_test", "evaluated_on")
    metrics = run.evaluate("test")
    assert {k: metrics[k] for k in figures} == {k: written[k] for k in figures}
    fresh = run.evaluate("test", seed=written["seed"] + 1)
    assert fresh["auc"] != written["auc"]  # S = 2 draws: other draws, other figures
    assert vkd_pyro.load_run(out).evaluate("test")["auc"] == written["auc"]
    assert main(["evaluate", "--run", str(out)]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert {k: again[k] for k in figures} == {k: written[k] for k in figures}
    with pytest.raises(ConfigError, match="train.max_epochs"):
        vkd_pyro.train(REPO / "configs" / "demo.yaml", out=tmp_path_factory.mktemp("bad") / "run",
                       train__max_epochs=0)
