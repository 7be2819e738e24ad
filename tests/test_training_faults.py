"""Training that survives faults: same seed same metrics, interrupt and resume, signals, NaNs, clipping.

Tiny runs (60 reports at 32 px, z of 16, a 32-wide text block, batches of 8: 6 steps an epoch)
share one cache of rendered images and frozen report features.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pytest
import torch

import vkd_pyro.training.build as build_step
from tests.conftest import FeaturesAsImages, MaskedMeanHead, tiny_batch
from tests.tiny_runs import tiny_overrides, write_config_file
from vkd_pyro.cli import main
from vkd_pyro.config import load_config
from vkd_pyro.errors import TrainingDiverged
from vkd_pyro.guides import EHRPosterior
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.models import VKDModel
from vkd_pyro.training.checkpoint import load_resume_state
from vkd_pyro.training.loop import TrainStep, fit
from vkd_pyro.training.stops import SignalFlag

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_overrides({"image_encoder.width": 4, "image_encoder.out_features": 16, "text_encoder.block_heads": None,
                       "text_encoder.block_ffn": None, "train.batch_size": 8, "train.max_epochs": 2,
                       "train.patience": 5})
TIMING_KEYS = {"train_seconds", "steps_per_second", "train_steps", "run_id", "provenance"}  # and who, when


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these networks are tiny, and on shared cores more threads only wait."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, cache):
    return write_config_file(tmp_path_factory.mktemp("config") / "tiny.yaml", TINY + [f"cache_dir={cache}"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config_file):
    """An uninterrupted run: its folder."""
    out = tmp_path_factory.mktemp("reference")
    torch.set_num_threads(1)
    fit(load_config(config_file), out)
    return out


def history(run: Path) -> list:
    """history.csv without the wall-clock column."""
    lines = (run / "history.csv").read_text().splitlines()
    return [line.rsplit(",", 1)[0] for line in lines]


def metrics(run: Path) -> dict:
    values = json.loads((run / "metrics.json").read_text())
    return {k: v for k, v in values.items() if k not in TIMING_KEYS}


def steps_per_epoch(run: Path) -> int:
    return int(load_resume_state(run)["annealing"]["T"])


def test_same_seed_same_metrics(tmp_path, config_file, reference):
    fit(load_config(config_file), tmp_path)
    assert history(tmp_path) == history(reference)
    assert len(history(reference)) == 3  # header + 2 epochs
    assert metrics(tmp_path) == metrics(reference)
    other = tmp_path / "seed1"
    fit(load_config(config_file, ["seed=1"]), other)
    assert history(other) != history(reference)  # the comparison can tell runs apart


@pytest.mark.parametrize("where", ["mid-epoch", "end of epoch"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, capsys, config_file, reference, where):
    T = steps_per_epoch(reference)
    stop = T + 2 if where == "mid-epoch" else T
    run = tmp_path / "run"
    code = main(["train", "--config", str(config_file), "--out", str(run), f"train.stop_after_steps={stop}"])
    err = capsys.readouterr().err
    assert code == 143  # as SIGTERM
    line = err.strip().splitlines()[-1]
    assert f"resume with: vkd-pyro train --resume {run}" in line
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert state["global_step"] == stop
    assert (state["epoch"], state["step_in_epoch"]) == ((2, 2) if where == "mid-epoch" else (1, T))
    assert set(state["rng"][0]) >= {"torch", "numpy", "random"}
    assert not (run / "metrics.json").exists()

    assert main(["train", "--resume", str(run)]) == 0
    assert history(run) == history(reference)
    assert metrics(run) == metrics(reference)
    final = load_resume_state(run)
    assert final["finished"] and final["global_step"] == 2 * T


def test_sigterm_writes_resume_state_and_resume_finishes(tmp_path, config_file, cache):
    """A real SIGTERM to a training process: exit 143, last.pt written, the run resumes to the end."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "vkd_pyro", "train", "--config", str(config_file), "--out", str(run),
         "train.max_epochs=500", "train.patience=500"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 150
        for line in process.stdout:  # wait until training is under way
            if line.startswith("epoch   1") or time.monotonic() > deadline:
                break
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, err
    assert "Traceback" not in err
    assert f"resume with: vkd-pyro train --resume {run}" in err.strip().splitlines()[-1]
    state = load_resume_state(run)
    assert state["global_step"] >= steps_per_epoch(run)
    assert main(["train", "--resume", str(run), f"train.max_epochs={state['epoch']}"]) == 0
    assert json.loads((run / "metrics.json").read_text())["best_epoch"] >= 1


def test_signal_flag_notes_signals_and_a_second_sigint_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with SignalFlag() as flag:
        signal.raise_signal(signal.SIGTERM)
        assert flag.signum == signal.SIGTERM
        signal.raise_signal(signal.SIGINT)
        assert flag.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def _names_in(message: str) -> set:
    found = re.search(r"\(step \d+ in all\): (.*?) (?:is|are) not finite", message)
    assert found, message
    return set(found.group(1).split(", "))


def test_nan_stops_the_run_naming_step_and_term_and_keeps_the_last_good_state(tmp_path, monkeypatch, config_file,
                                                                              reference):
    T = steps_per_epoch(reference)
    calls = {"n": 0}

    def poison(module, inputs, output):  # q(y | z_T) becomes NaN at step T + 2
        calls["n"] += 1
        return output * float("nan") if calls["n"] == T + 2 else output

    build = build_step.build_module  # what the trainer's initial_module builds with

    def build_poisoned(*args, **kwargs):
        module = build(*args, **kwargs)
        module.model.text_classifier.register_forward_hook(poison)
        return module

    monkeypatch.setattr(build_step, "build_module", build_poisoned)
    with pytest.raises(TrainingDiverged) as err:
        fit(load_config(config_file), tmp_path)
    message = str(err.value)
    assert f"epoch 2, step 2 (step {T + 2} in all)" in message
    names = _names_in(message)
    assert "text_nll" in names and "loss" in names
    assert "image_nll" not in names and "kl" not in names
    assert "last.pt keeps the last good state (end of epoch 1)" in message
    state = load_resume_state(tmp_path)  # untouched since the end of epoch 1
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (2, 0, T)
    assert all(torch.isfinite(v).all() for v in state["module"].values() if v.is_floating_point())
    assert (tmp_path / "checkpoint.pt").is_file() and not (tmp_path / "metrics.json").exists()


def test_exploding_learning_rate_is_one_clear_line(tmp_path, capsys, config_file):
    code = main(["train", "--config", str(config_file), "--out", str(tmp_path), "train.lr=1e30"])
    err = capsys.readouterr().err
    assert code == 3  # a diverged run has its own status (2 is a bad input)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert re.search(r"training diverged at epoch \d+, step \d+", lines[0])
    assert _names_in(lines[0]) & {"loss", "image_nll", "text_nll", "kl", "gradient norm"}
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "failed" and record["reason"].startswith("diverged: training diverged at epoch")


def test_speed_options_and_periodic_checkpoints_run(tmp_path, config_file):
    """bf16 autocast, channels-last, clipping and mid-epoch last.pt together: a finite, finished run."""
    config = load_config(config_file, ["train.amp=bf16", "image_encoder.channels_last=true", "train.grad_clip=1.0",
                                       "train.checkpoint_every=4", "train.max_epochs=1"])
    result = fit(config, tmp_path)
    assert result["best_epoch"] == 1 and math.isfinite(float(history(tmp_path)[1].split(",")[2]))
    state = load_resume_state(tmp_path)
    assert state["finished"] and state["config"]["train"]["amp"] == "bf16"


# --------------------------------------------------------------------------- the step itself


def tiny_module():
    model = VKDModel(FeaturesAsImages(5), 14, z_dim=3, hidden=[8], dropout=0.0)
    guide = EHRPosterior(MaskedMeanHead(6), 3, [8], 0.0)
    return VKDModule(model, guide)


def grad_norm(module):
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None]))


def test_gradient_clipping_bounds_the_gradient_norm():
    module = tiny_module()
    step = TrainStep(module, module, torch.optim.SGD(module.parameters(), lr=0.0), grad_clip=None)
    _, norm = step(tiny_batch(), 1.0, 8)
    assert grad_norm(module) == pytest.approx(norm.item(), rel=1e-5) and norm > 0.01
    clipped = TrainStep(module, module, torch.optim.SGD(module.parameters(), lr=0.0), grad_clip=0.01)
    pyro.set_rng_seed(0)
    _, norm = clipped(tiny_batch(), 1.0, 8)
    assert norm > 0.01  # the norm before clipping is reported
    assert grad_norm(module) == pytest.approx(0.01, rel=1e-4)


def test_train_step_reads_nothing_back_to_the_host_beyond_pyros_own(monkeypatch):
    """No .item(), .tolist(), float(), int() or bool() of a tensor in vkd-pyro's code inside a step:
    on a GPU each would wait for the device. Pyro's public `Trace_ELBO.differentiable_loss` reads
    its loss value back itself (`torch_item` per site, a NaN check): those reads are counted apart."""
    module = tiny_module()
    optimizer = torch.optim.Adam(module.parameters())
    step = TrainStep(module, module, optimizer, grad_clip=1.0)
    batch = tiny_batch()
    reads, pyro_reads = [], []

    def forbidden(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            # Adam's step counters live on the CPU even for GPU parameters: reading them is free.
            counters = [state.get("step") for state in optimizer.state.values()]
            caller = sys._getframe(1).f_code.co_filename
            if any(self is counter for counter in counters):
                pass
            elif f"{os.sep}pyro{os.sep}" in caller:
                pyro_reads.append(name)
            else:
                reads.append((name, caller))
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    with pyro.validation_enabled(False):
        terms, norm = step(batch, 0.5, 8)
        step(batch, 1.0, 8)
    monkeypatch.undo()
    assert reads == []
    assert 0 < len(pyro_reads) <= 2 * 8  # two steps; Pyro's own read-backs, a few per step
    assert terms.shape == (4,) and torch.isfinite(terms).all() and norm.dim() == 0
