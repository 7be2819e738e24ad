"""Launchers: a sweep on two local workers with their thread shares, and as submitit jobs (its local executor)."""

import csv
import json
import os
import sys

import pytest

from tests.tiny_runs import tiny_overrides
from vkd_pyro.analysis.launch import RECORD, WORKER_LOG, Job, LocalLauncher, parse_minutes, thread_share
from vkd_pyro.cli import main
from vkd_pyro.config import load_config
from vkd_pyro.data.prepare import prepare_data
from vkd_pyro.errors import UserError

TINY = tiny_overrides()
GRID = ["--grid", "inference.prior_samples=1,2"]
NAMES = ["inference.prior_samples=1-seed0", "inference.prior_samples=2-seed0"]


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
    (["--slurm-partition", "gpu"], "--slurm-*: only with --launcher submitit"),
    (["--launcher", "submitit", "--slurm-time", "soon"], "--slurm-time soon"),
    (["--launcher", "submitit", "--jobs", "2"], "--jobs: for --launcher local"),
])
def test_bad_launch_options_are_one_line_errors_before_any_run(options, message, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["sweep", "--config", "configs/demo.yaml", *GRID, "--out", str(out), *options, *TINY])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (out / "runs").exists()


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


def test_submitit_local_executor_runs_the_grid(tmp_path, cache):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install vkd-pyro[cluster])")
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", "configs/demo.yaml", *GRID, "--out", str(out), "--launcher", "submitit",
                 "--submitit-cluster", "local", "--slurm-cpus", "1", "--slurm-time", "10", f"cache_dir={cache}",
                 *TINY]) == 0
    for record in records(out).values():
        assert record["launcher"] == "submitit" and record["threads"] == 1 and record["OMP_NUM_THREADS"] == "1"
        assert record["pid"] != os.getpid() and record["result"]["error"] is None
    assert [r["run"] for r in sweep_rows(out)] == NAMES
    assert any((out / "submitit").rglob("*_log.out"))  # submitit's own files, under the sweep folder
