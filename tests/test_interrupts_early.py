"""A signal at any point of a run leaves a state the next command can use (issue #19, class 3).

Before the first checkpoint (while the folder is claimed, while the data is prepared, while the
reports are encoded) and after the last one (the test report), SIGINT and SIGTERM stop the run with
one line saying how to go on and the shell's status (130 / 143); run.json says `interrupted`;
config.yaml is there from the start; `train --resume` works: a run with no last.pt yet starts from
the beginning in the same folder, keeping its run id. A process killed outright (SIGKILL) leaves
run.json `running`, and `--resume` starts it over too.

Real signals: one subprocess per case where the process is signalled from outside (a patched text
encoder writes a marker, then waits: the signal lands while the reports are encoded), and in-process
runs that raise the signal themselves at a chosen point (`signal.raise_signal`).
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vkd_pyro.training.loop as loop
import vkd_pyro.training.run_folder as run_folder
from tests.tiny_runs import tiny_overrides, write_config_file
from vkd_pyro.cli import main
from vkd_pyro.errors import Interrupted
from vkd_pyro.training.stops import SignalFlag

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_overrides({"image_encoder.width": 4, "image_encoder.out_features": 16, "text_encoder.block_heads": None,
                       "text_encoder.block_ffn": None, "train.batch_size": 8})
# Runs `vkd-pyro` with the text encoder replaced by one that writes a marker file and waits.
RUNNER = """
import sys, time
from pathlib import Path
from vkd_pyro.encoders.text import FrozenTextEncoder

def encode(self, *args, **kwargs):
    Path(sys.argv[1]).write_text("encoding")
    time.sleep(300)

FrozenTextEncoder.encode = encode
from vkd_pyro.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """The tiny config as a file, its cache shared with the other tests of tiny runs."""
    cache = tmp_path_factory.getbasetemp() / "objectives-cache"
    return write_config_file(tmp_path_factory.mktemp("config") / "tiny.yaml", TINY + [f"cache_dir={cache}"])


def record(run: Path) -> dict:
    return json.loads((run / run_folder.RUN_FILE).read_text())


def cli(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_stopped(run: Path, code: int, err: str, signum: int, last_pt: bool) -> str:
    """The shell's status, one line ending with the resume command, run.json `interrupted`, config.yaml
    there; returns the run id."""
    lines = err.strip().splitlines()
    assert code == 128 + signum and "Traceback" not in err, err
    name = signal.Signals(signum).name
    assert lines[-1].startswith(f"vkd-pyro: interrupted by {name} ("), lines
    assert lines[-1].endswith(f"resume with: vkd-pyro train --resume {shlex.quote(str(run))}"), lines
    assert ("it goes on from its last.pt" if last_pt else "no checkpoint yet: it starts from the beginning") in lines[-1]
    assert (run / "last.pt").is_file() == last_pt
    assert (run / "config.yaml").is_file() and not (run / "metrics.json").exists()
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]
    found = record(run)
    assert found["status"] == "interrupted" and f"interrupted by {name}" in found["reason"]
    return found["run_id"]


def check_resumed(run: Path, run_id: str, capsys, *, from_start: bool) -> None:
    """`train --resume` finishes the run in the same folder under the same run id."""
    code, out, err = cli(["train", "--resume", run], capsys)
    assert code == 0, err
    assert (f"{run}: no resume state yet: training run {run_id} from the beginning" in out) == from_start, out
    found = record(run)
    assert found["status"] == "finished" and found["run_id"] == run_id and found["resumed"] == 1
    assert json.loads((run / "metrics.json").read_text())["run_id"] == run_id
    assert torch.load(run / "last.pt", weights_only=True)["finished"]


# --------------------------------------------------------------------------- signalled from outside


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_signal_while_the_reports_are_encoded(tmp_path, capsys, signum):
    """A process signalled while it encodes the reports (its own, empty cache): SIGTERM is one line
    and status 143, SIGKILL leaves run.json `running`; `--resume` starts the run over either way."""
    marker, run = tmp_path / "encoding", tmp_path / "run"
    config = write_config_file(tmp_path / "tiny.yaml", TINY + [f"cache_dir={tmp_path / 'cache'}"])
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(tmp_path / "runner.py"), str(marker), "train", "--config",
                                str(config), "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), process.communicate(timeout=5)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    if signum == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
        run_id = record(run)["run_id"]
        assert record(run)["status"] == "running" and (run / "config.yaml").is_file()
    else:
        run_id = check_stopped(run, process.returncode, err, signum, last_pt=False)
        assert len(err.strip().splitlines()) == 1, err
    code, _, err = cli(["train", "--config", config, "--out", run], capsys)  # the same command: refused, says why
    assert code == 2 and f"continue it with --resume {run}" in err, err
    check_resumed(run, run_id, capsys, from_start=True)


# --------------------------------------------------------------------------- raised at a chosen point


def raising_first(monkeypatch, owner, name: str, signum: int) -> None:
    """Replace owner.name by a function that raises `signum` in this process, then calls the original."""
    original = getattr(owner, name)

    def signalled(*args, **kwargs):
        signal.raise_signal(signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, signalled)


@pytest.mark.parametrize("where, signum", [
    ("claiming the folder", signal.SIGTERM),  # before config.yaml is written: noted, acted on once it is
    ("preparing the data", signal.SIGINT),
    ("preparing the data", signal.SIGHUP),  # the terminal closed
    ("the test report", signal.SIGTERM),  # after the last checkpoint: the resume evaluates again
], ids=["SIGTERM claiming the folder", "SIGINT preparing the data", "SIGHUP preparing the data",
        "SIGTERM in the test report"])
def test_a_signal_outside_the_training_loop(tmp_path, capsys, monkeypatch, config_file, where, signum):
    run = tmp_path / "run"
    owner, name = {"claiming the folder": (run_folder, "_claim"), "preparing the data": (loop, "prepare_data"),
                   "the test report": (loop, "report")}[where]
    raising_first(monkeypatch, owner, name, signum)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    code, _, err = cli(["train", "--config", config_file, "--out", run], capsys)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers given back
    after_training = where == "the test report"
    run_id = check_stopped(run, code, err, signum, last_pt=after_training)
    monkeypatch.undo()
    check_resumed(run, run_id, capsys, from_start=not after_training)
    if after_training:
        assert "training had finished" in (run / "run.log").read_text()


# --------------------------------------------------------------------------- the flag itself


def test_the_run_flag_raises_outside_deferred_blocks_and_notes_inside():
    made = []

    def interrupted(signum):
        made.append(signum)
        return Interrupted(f"stopped by {signum}", signum)

    before = signal.getsignal(signal.SIGTERM)
    with SignalFlag(interrupted) as flag:
        with pytest.raises(Interrupted, match=f"stopped by {int(signal.SIGINT)}"):
            signal.raise_signal(signal.SIGINT)  # raising at once
        signal.raise_signal(signal.SIGTERM)  # the run is stopping: ignored while it writes how it ended
        assert made == [signal.SIGINT]
    with SignalFlag(interrupted) as flag:
        with pytest.raises(Interrupted):
            with flag.deferred():
                signal.raise_signal(signal.SIGTERM)
                assert flag.signum == signal.SIGTERM  # noted, the block goes on ...
            pytest.fail("not reached")  # ... and it is acted on when the block ends
        assert made == [signal.SIGINT, signal.SIGTERM]
    with SignalFlag(interrupted) as flag:
        with pytest.raises(ValueError):
            with flag.deferred():  # a block that ends with its own error: that error, no Interrupted
                signal.raise_signal(signal.SIGTERM)
                raise ValueError("refused")
        assert made == [signal.SIGINT, signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before
