"""Nothing a `train --resume` refuses changes the run (issue #19, class 2).

One tiny run is trained once; each case resumes a copy of its folder through the CLI. A refusal
(a truncated last.pt, a config.yaml that no longer matches the weights, an override that would
change the model) is one line with status 2 and leaves every file as it was: run.json (a finished
run stays `finished`), metrics.json, the checkpoints, config.yaml, history.csv and run.log (nothing
is appended to it: the refusal comes before the run log is opened). A finished run resumed with
nothing more to do says so in one line, exits 0 and writes nothing; with train.max_epochs raised it
trains on. `.lock` is left out of the snapshots: the resuming process writes its pid into it (the
lock file belongs to no run).
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_run_folder import snapshot
from tests.tiny_runs import copy_run
from vkd_pyro.cli import main
from vkd_pyro.training.run_folder import RUN_FILE


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def run(tmp_path, tiny_trained_run):
    return copy_run(tiny_trained_run, tmp_path)


def resume(run: Path, capsys, *overrides) -> tuple[int, str, str]:
    code = main(["train", "--resume", str(run), *overrides])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def truncate_half(run: Path) -> tuple:
    path = run / "last.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return (), "last.pt: not a readable vkd-pyro checkpoint"


def truncate_empty(run: Path) -> tuple:
    (run / "last.pt").write_bytes(b"")
    return (), "last.pt: not a readable vkd-pyro checkpoint"


def edit_z_dim(run: Path) -> tuple:
    path = run / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["model"]["z_dim"] = 2 * config["model"]["z_dim"]
    path.write_text(yaml.safe_dump(config))
    return (), "config.yaml: does not match the weights in"


def edit_hidden(run: Path) -> tuple:
    path = run / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["model"]["hidden"] = [24]
    path.write_text(yaml.safe_dump(config))
    return (), "model.hidden: [16] in last.pt, [24] in config.yaml"


def refused_override(run: Path) -> tuple:
    return ("model.z_dim=8",), "model.z_dim: cannot be changed when resuming"


@pytest.mark.parametrize("spoil", [truncate_half, truncate_empty, edit_z_dim, edit_hidden, refused_override])
def test_a_refused_resume_changes_nothing(run, capsys, spoil):
    overrides, expected = spoil(run)
    assert json.loads((run / RUN_FILE).read_text())["status"] == "finished"
    before = snapshot(run)
    code, out, err = resume(run, capsys, *overrides)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("vkd-pyro: error: ") and expected in lines[0], lines[0]
    assert not out.strip(), out
    assert snapshot(run) == before  # run.json still `finished`, metrics.json and the checkpoints as they were


@pytest.mark.parametrize("overrides", [(), ("train.max_epochs=1", "train.patience=7")])
def test_resuming_a_finished_run_says_so_and_changes_nothing(run, capsys, overrides):
    before = snapshot(run)
    best = json.loads((run / "metrics.json").read_text())["best_epoch"]
    code, out, err = resume(run, capsys, *overrides)
    lines = out.strip().splitlines()
    assert code == 0 and not err.strip(), err
    assert len(lines) == 1, out
    assert lines[0].startswith(f"{run}: run ") and "is finished" in lines[0] and f"best epoch {best}" in lines[0]
    assert snapshot(run) == before


@pytest.mark.parametrize("epochs", [2, 3])
def test_resuming_a_finished_run_with_more_epochs_trains_on(run, capsys, epochs):
    rows = (run / "history.csv").read_text().strip().splitlines()
    code, out, err = resume(run, capsys, f"train.max_epochs={epochs}")
    assert code == 0, err
    assert "training on" in out
    grown = (run / "history.csv").read_text().strip().splitlines()
    assert len(grown) == len(rows) + epochs - 1 and grown[: len(rows)] == rows
    record = json.loads((run / RUN_FILE).read_text())
    assert record["status"] == "finished" and record["resumed"] == 1
    assert json.loads((run / "metrics.json").read_text())["train_steps"] > 0


@pytest.mark.parametrize("error", [ValueError("data: refused"), KeyboardInterrupt()])
def test_a_resume_failing_before_its_first_step_puts_the_files_back(run, error):
    """A failure after the folder was claimed but before training (the Trainer's data, restore):
    run.json, config.yaml and history.csv as they were, byte for byte; no history.csv added."""
    from vkd_pyro.training.run_folder import open_run

    (run / "history.csv").unlink()
    before = {name: data for name, (data, _) in snapshot(run).items()}
    with pytest.raises(type(error)), open_run(run, "resume") as opened:
        assert json.loads((run / RUN_FILE).read_text())["status"] == "running"
        (run / "config.yaml").write_text("rewritten\n")
        (run / "history.csv").write_text("epoch\n")
        assert not opened.training
        raise error
    assert {name: data for name, (data, _) in snapshot(run).items()} == before
