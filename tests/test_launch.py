"""Launchers: a sweep on two local workers with their thread shares, and as submitit jobs (its local executor);
options a launcher would ignore refused before any run; a signal to the launcher stops its workers, which write
their resume state, and the same command again finishes them."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny_runs import tiny_overrides
from vkd_pyro.analysis.launch import RECORD, WORKER_LOG, Job, LocalLauncher, make_launcher, parse_minutes, thread_share
from vkd_pyro.cli import main
from vkd_pyro.config import load_config
from vkd_pyro.data.prepare import prepare_data
from vkd_pyro.errors import UserError

TINY = tiny_overrides()
GRID = ["--grid", "inference.prior_samples=1,2"]
NAMES = ["inference.prior_samples=1-seed0", "inference.prior_samples=2-seed0"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache of the report features, filled once here rather than by both workers at once."""
    folder = tmp_path_factory.mktemp("cache")
    prepare_data(load_config("configs/demo.yaml", [*TINY, f"cache_dir={folder}"]), with_reports=True)
    return folder


def records(out) -> dict:
    return {name: json.loads((out / "runs" / name / RECORD).read_text()) for name in NAMES}


def sweep_rows(out) -> list:
    with open(out / "sweep.csv") as f:
        return list(csv.DictReader(f))


def test_thread_share_and_slurm_time():
    assert [thread_share(j, cores=2) for j in (1, 2, 3)] == [2, 1, 1]
    assert [thread_share(j, cores=16) for j in (1, 3, 4, 32)] == [16, 5, 4, 1]
    assert parse_minutes("90") == 90 and parse_minutes("01:30:00") == 90 and parse_minutes("1-02:00") == 1560
    assert parse_minutes("00:10:01") == 11 and parse_minutes("30:00") == 30
    for bad in ("soon", "0", "1:2:3:4", ""):
        with pytest.raises(UserError, match="--slurm-time"):
            parse_minutes(bad)


@pytest.mark.parametrize("options, message", [
    (["--jobs", "0"], "--jobs: must be >= 1, got 0"),
    (["--slurm-partition", "gpu"], "--launcher local ignores --slurm-partition: it is for --launcher submitit"),
    (["--jobs", "2", "--slurm-gpus", "1", "--submitit-cluster", "local"],
     "--launcher local ignores --slurm-gpus, --submitit-cluster: they are for --launcher submitit"),
    (["--launcher", "submitit", "--slurm-time", "soon"], "--slurm-time soon"),
    (["--launcher", "submitit", "--jobs", "2"], "--launcher submitit ignores --jobs: the cluster runs its jobs"),
    (["--launcher", "submitit", "--jobs", "1", "--submitit-cluster", "local"], "--launcher submitit ignores --jobs"),
])
def test_bad_launch_options_are_one_line_errors_before_any_run(options, message, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["sweep", "--config", "configs/demo.yaml", *GRID, "--out", str(out), *options, *TINY])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


NO_SLURM = ("--launcher submitit: no SLURM on this machine (srun is not on PATH), so the runs would go to submitit's "
            "local executor, all at once on this machine")


@pytest.mark.parametrize("options, message", [
    ([], NO_SLURM + "; add --submitit-cluster local for that"),
    (["--slurm-partition", "gpu", "--slurm-cpus", "1"], NO_SLURM + ", which ignores --slurm-partition; add"),
    (["--submitit-cluster", "local", "--slurm-partition", "gpu"],
     "--submitit-cluster local ignores --slurm-partition (a SLURM partition): leave it out"),
    (["--submitit-cluster", "slurm"], "no SLURM on this machine to submit to (sbatch is not on PATH)"),
])
def test_submitit_without_slurm_is_refused_unless_the_local_executor_is_asked_for(options, message, tmp_path,
                                                                                 capsys, monkeypatch):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install vkd-pyro[cluster])")
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # neither srun nor sbatch
    out = tmp_path / "out"
    code = main(["sweep", "--config", "configs/demo.yaml", *GRID, "--out", str(out), "--launcher", "submitit",
                 *options, *TINY])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_on_a_slurm_machine_submitit_takes_the_partition_and_its_local_executor_refuses_it(tmp_path, monkeypatch):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install vkd-pyro[cluster])")
    (tmp_path / "bin").mkdir()
    for command in ("srun", "sbatch"):  # stand-ins: what submitit and the check look for; nothing is submitted
        (tmp_path / "bin" / command).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / "bin" / command).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    options = {"partition": "gpu", "time_minutes": 30, "gpus": 1, "cpus": 4}
    launcher = make_launcher("submitit", None, tmp_path / "submitit", **options, cluster=None)
    assert launcher.cluster == "slurm" and launcher.parameters["slurm_partition"] == "gpu"
    assert launcher.describe() == "submitit (slurm), one job per run, 4 thread(s) each, at most 30 min each"
    with pytest.raises(UserError, match=r"^--submitit-cluster local ignores --slurm-partition"):
        make_launcher("submitit", None, tmp_path / "submitit", **options, cluster="local")
    with pytest.raises(UserError, match=r"^--launcher submitit ignores --jobs"):
        make_launcher("submitit", 4, tmp_path / "submitit", **options, cluster=None)
    assert not (tmp_path / "submitit").exists()


def test_missing_submitit_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    code = main(["sweep", "--config", "configs/demo.yaml", *GRID, "--out", str(tmp_path / "out"),
                 "--launcher", "submitit", *TINY])
    assert code == 2 and "pip install vkd-pyro[cluster]" in capsys.readouterr().err


def crash_but_on_a(task) -> dict:
    if task != "a":
        raise ValueError(f"worker bug on {task}")
    return {"error": None, "task": task}


def test_a_crashed_worker_is_a_failed_run_and_the_others_go_on(tmp_path, monkeypatch):
    # pytest imports this file as `test_launch`: the workers unpickle `work` from there
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    jobs = [Job(name, name, tmp_path / name) for name in ("a", "b", "c")]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / RECORD).write_text('{"stale": true}')  # from an earlier attempt: not read back
    done = {}
    LocalLauncher(2).run(jobs, crash_but_on_a, done.__setitem__, say=lambda line: None)
    assert done["a"]["result"] == {"error": None, "task": "a"} and done["a"]["threads"] == thread_share(2)
    for name in ("b", "c"):
        assert done[name]["result"] is None
        assert done[name]["error"].startswith("worker exited with status 1 (ValueError: worker bug on " + name)
        assert "Traceback" in (tmp_path / name / WORKER_LOG).read_text()
        assert not (tmp_path / name / RECORD).exists() and not (tmp_path / name / "launch_task.pkl").exists()


def test_two_local_workers_train_side_by_side_with_their_thread_share(tmp_path, cache, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--config", "configs/demo.yaml", *GRID, "--jobs", "2", "--out", str(out), f"cache_dir={cache}",
            *TINY]
    assert main(args) == 0
    share = thread_share(2)
    first = records(out)
    for name, record in first.items():
        assert record["launcher"] == "local" and record["error"] is None and record["result"]["error"] is None
        # each worker got its share, in torch and in its environment
        assert record["threads"] == share and record["OMP_NUM_THREADS"] == record["MKL_NUM_THREADS"] == str(share)
        assert record["pid"] != os.getpid()
        for file in ["metrics.json", "sweep_run.json", "launch.log"]:
            assert (out / "runs" / name / file).is_file(), (name, file)
        assert not (out / "runs" / name / "launch_task.pkl").exists()
    a, b = first.values()
    assert a["pid"] != b["pid"]
    assert max(a["started_at"], b["started_at"]) < min(a["ended_at"], b["ended_at"])  # they overlapped
    rows = sweep_rows(out)
    assert [r["run"] for r in rows] == NAMES and all(0.0 <= float(r["macro_auc"]) <= 1.0 for r in rows)
    assert (out / "sweep.png").is_file()

    capsys.readouterr()
    assert main(args) == 0  # started again: nothing left to train, no worker started
    assert capsys.readouterr().out.count("finished before, skipped") == 2
    assert records(out) == first and [r["run"] for r in sweep_rows(out)] == NAMES


def test_submitit_local_executor_runs_the_grid(tmp_path, cache, capsys):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install vkd-pyro[cluster])")
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", "configs/demo.yaml", *GRID, "--out", str(out), "--launcher", "submitit",
                 "--submitit-cluster", "local", "--slurm-cpus", "1", "--slurm-time", "10", f"cache_dir={cache}",
                 *TINY]) == 0
    said = capsys.readouterr().out
    assert ("sweep: 2 run(s) to train: submitit's local executor (--submitit-cluster local): every run at once on "
            "this machine, 1 thread(s) each, at most 10 min each") in said
    for record in records(out).values():
        assert record["launcher"] == "submitit" and record["threads"] == 1 and record["OMP_NUM_THREADS"] == "1"
        assert record["pid"] != os.getpid() and record["result"]["error"] is None
    assert [r["run"] for r in sweep_rows(out)] == NAMES
    assert any((out / "submitit").rglob("*_log.out"))  # submitit's own files, under the sweep folder


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, ended but not yet reaped by its new parent, does not)."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except ProcessLookupError:
        return False
    except OSError:  # no /proc (not Linux), or it ended between the two looks
        return not Path("/proc").is_dir() or Path(f"/proc/{pid}").exists()


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


EPOCHS = 30  # the two workers are caught training (the signal follows their first history.csv at once)
STOP_EPOCHS = tiny_overrides({"train.max_epochs": EPOCHS, "train.patience": EPOCHS})


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_stopped_sweep_stops_its_workers_and_the_same_command_finishes_them(tmp_path, cache, capsys, signum):
    """SIGHUP and SIGTERM: the launcher stops its workers (each writes last.pt), says how to go on and
    exits 128 + signal; SIGKILL (Linux): the workers get SIGTERM as their launcher dies. Either way no
    worker outlives the launcher, both runs are `interrupted`, and the same command resumes them."""
    if signum == signal.SIGKILL and not sys.platform.startswith("linux"):
        pytest.skip("workers follow a killed launcher through prctl(PR_SET_PDEATHSIG), Linux only")
    out = tmp_path / "sweep"
    args = ["sweep", "--config", "configs/demo.yaml", *GRID, "--jobs", "2", "--out", str(out),
            f"cache_dir={cache}", *STOP_EPOCHS]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        launcher = subprocess.Popen([sys.executable, "-m", "vkd_pyro", *args], cwd=REPO, env=env,
                                    stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
    try:
        # both workers are training: each has written its history.csv
        wait_until(lambda: all((out / "runs" / n / "history.csv").is_file() for n in NAMES) or
                   launcher.poll() is not None, 90, "both workers to train")
        assert launcher.poll() is None, (tmp_path / "stderr").read_text()
        launcher.send_signal(signum)
        launcher.wait(90)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    workers = [int(pid) for pid in re.findall(r"worker pid (\d+)", (tmp_path / "stdout").read_text())]
    assert len(workers) == 2
    wait_until(lambda: not any(alive(pid) for pid in workers), 60, "the workers to end")  # no orphan trains on
    err = (tmp_path / "stderr").read_text()
    if signum == signal.SIGKILL:
        assert launcher.returncode == -signal.SIGKILL
    else:
        assert launcher.returncode == 128 + signum and "Traceback" not in err
        assert err.strip().splitlines()[-1] == (
            f"vkd-pyro: sweep stopped by {signal.Signals(signum).name}: 2 run(s) stopped and wrote their resume "
            "state last.pt; to go on, run the same command again (it resumes the stopped runs from last.pt and "
            "trains the rest)")
    for name in NAMES:
        folder = out / "runs" / name
        assert json.loads((folder / "run.json").read_text())["status"] == "interrupted"
        assert (folder / "last.pt").is_file() and not (folder / "metrics.json").exists()

    capsys.readouterr()
    assert main(args) == 0  # the same command: both runs resume where they stopped and finish
    said = capsys.readouterr().out
    assert said.count(": resuming from last.pt (worker pid") == 2 and "sweep: 2 trained" in said
    for name in NAMES:
        folder = out / "runs" / name
        assert json.loads((folder / "run.json").read_text())["status"] == "finished"
        with open(folder / "history.csv") as f:
            assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(1, EPOCHS + 1))
    assert [r["run"] for r in sweep_rows(out)] == NAMES
