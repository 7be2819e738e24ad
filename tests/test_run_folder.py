"""Run folders that cannot be mixed up (issue #10), each bad input tried through the CLI as a user would.

Every refusal is checked for its one line, its exit status and that the files that were there before
are unchanged (names, bytes, mtimes). `.lock` is left out of the snapshots: a refused process may
hold the lock for a moment and writes its pid into it (the lock file belongs to no run).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

import vkd_pyro.cli.commands
from tests.tiny_runs import tiny_overrides, write_config_file
from vkd_pyro.cli import main
from vkd_pyro.config import load_config
from vkd_pyro.files import TEMPORARY_MARK
from vkd_pyro.training.run_folder import LOCK_FILE, RUN_FILE, default_run_folder, folder_lock, open_run

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_overrides({"image_encoder.width": 4, "image_encoder.out_features": 16, "text_encoder.block_heads": None,
                       "text_encoder.block_ffn": None, "train.batch_size": 8})


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """The tiny config as a file (with its own cache), as a user would write it."""
    folder = tmp_path_factory.mktemp("config")
    return write_config_file(folder / "tiny.yaml", TINY + [f"cache_dir={folder / 'cache'}"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, config_file):
    """A finished run trained through the CLI (one epoch)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    torch.set_num_threads(1)
    assert main(["train", "--config", str(config_file), "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(tmp_path, finished):
    target = tmp_path / "copy"
    shutil.copytree(finished, target)
    return target


def snapshot(folder: Path) -> dict:
    """name -> (bytes, mtime) of every file below `folder`, the lock file aside."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def cli(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("vkd-pyro: error: "), err
    return lines[0]


def run_ids(folder: Path) -> dict:
    return {"run.json": json.loads((folder / RUN_FILE).read_text())["run_id"],
            "checkpoint.pt": torch.load(folder / "checkpoint.pt", weights_only=True).get("run_id"),
            "last.pt": torch.load(folder / "last.pt", weights_only=True).get("run_id"),
            "metrics.json": json.loads((folder / "metrics.json").read_text()).get("run_id")}


@contextmanager
def read_only(folder: Path):
    """A folder nobody can create files in: chmod for a user, the immutable attribute for root
    (root writes through a chmod)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
            pytest.skip("root without chattr: no read-only folder to try")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


# --------------------------------------------------------------------------- one run per folder


def test_a_finished_run_carries_one_run_id_everywhere(finished):
    record = json.loads((finished / RUN_FILE).read_text())
    assert record["status"] == "finished" and record["reason"] is None and record["ended"]
    assert len(set(run_ids(finished).values())) == 1 and len(record["run_id"]) == 32


def test_train_into_a_folder_holding_another_run_is_refused(run_copy, config_file, capsys):
    before = snapshot(run_copy)
    code, _, err = cli(["train", "--config", config_file, "--out", run_copy, "train.lr=0.01"], capsys)
    line = one_line(err)
    assert code == 2 and f"{run_copy}: holds run " in line and "(finished)" in line
    assert "--resume" in line and "--overwrite" in line
    assert snapshot(run_copy) == before


def test_overwrite_moves_the_old_run_aside_and_trains_a_new_one(run_copy, config_file, capsys):
    before = snapshot(run_copy)
    old_id = json.loads((run_copy / RUN_FILE).read_text())["run_id"]
    code, out, err = cli(["train", "--config", config_file, "--out", run_copy, "--overwrite"], capsys)
    assert code == 0, err
    aside = [p for p in run_copy.iterdir() if p.name.startswith(".replaced-")]
    assert len(aside) == 1 and f"moved the {len(before)} files of the previous run {old_id} into {aside[0]}" in out
    assert snapshot(aside[0]) == before  # every old file, byte for byte
    ids = run_ids(run_copy)
    assert len(set(ids.values())) == 1 and ids["run.json"] != old_id


def test_resume_and_overwrite_together_are_refused(run_copy, capsys):
    before = snapshot(run_copy)
    code, _, err = cli(["train", "--resume", run_copy, "--overwrite"], capsys)
    assert code == 2 and "--resume and --overwrite: give one" in one_line(err)
    assert snapshot(run_copy) == before


def test_default_folder_name_changes_with_the_overrides(config_file, monkeypatch, tmp_path, capsys):
    folders = []
    monkeypatch.setattr(vkd_pyro.cli.commands, "fit", lambda config, out, **kw: folders.append(out))
    for lr in ("0.1", "0.01", "0.1"):
        assert main(["train", "--config", str(config_file), f"train.lr={lr}"]) == 0
    assert folders[0] != folders[1] and folders[0] == folders[2]
    assert folders[0].parent == Path("runs") and folders[0].name.startswith("tiny-vkd-seed0-")
    assert folders[0] == default_run_folder(config_file, load_config(config_file, ["train.lr=0.1"]))


# --------------------------------------------------------------------------- weights and config of one run


def test_evaluate_and_predict_refuse_weights_of_another_run(run_copy, capsys, tmp_path):
    checkpoint = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    other = "0" * 32
    torch.save({**checkpoint, "run_id": other}, run_copy / "checkpoint.pt")  # as if left by an earlier run
    image = tmp_path / "x.png"
    from PIL import Image
    Image.new("L", (32, 32), 128).save(image)
    before = snapshot(run_copy)
    for argv in (["evaluate", "--run", run_copy], ["predict", "--run", run_copy, image]):
        code, _, err = cli(argv, capsys)
        line = one_line(err)
        assert code == 2 and f"checkpoint.pt is from run {other}" in line and "do not belong to this config" in line
    torch.save({k: v for k, v in checkpoint.items() if k != "run_id"}, run_copy / "checkpoint.pt")  # no id
    code, _, err = cli(["evaluate", "--run", run_copy], capsys)
    assert code == 2 and "checkpoint.pt is from run (no run id)" in one_line(err)
    assert set(snapshot(run_copy)) == set(before)
    assert {k: v for k, v in snapshot(run_copy).items() if k != "checkpoint.pt"} == \
        {k: v for k, v in before.items() if k != "checkpoint.pt"}


def test_a_run_being_trained_now_is_not_evaluated(run_copy, capsys):
    record = json.loads((run_copy / RUN_FILE).read_text())
    (run_copy / RUN_FILE).write_text(json.dumps({**record, "status": "running"}))
    before = snapshot(run_copy)
    with folder_lock(run_copy):  # the training process, here this one on another descriptor
        code, _, err = cli(["evaluate", "--run", run_copy], capsys)
    line = one_line(err)
    assert code == 2 and "is being trained now (pid " in line and f"pid {os.getpid()} on host" in line
    assert snapshot(run_copy) == before


def test_a_failed_run_without_checkpoint_is_one_line(tmp_path, config_file, capsys):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with open_run(run, "new"):
            (run / "config.yaml").write_text(config_file.read_text())
            raise RuntimeError("killed before the first epoch")
    before = snapshot(run)
    code, _, err = cli(["evaluate", "--run", run], capsys)
    line = one_line(err)
    assert code == 2 and "is failed (RuntimeError: killed before the first epoch)" in line
    assert "has written no checkpoint.pt" in line and snapshot(run) == before


def test_evaluate_says_only_what_it_wrote(run_copy, capsys):
    before = snapshot(run_copy)
    time.sleep(0.01)
    code, out, err = cli(["evaluate", "--run", run_copy, "--split", "validation"], capsys)
    assert code == 0, err
    after = snapshot(run_copy)
    changed = {name for name in after if before.get(name) != after[name]}
    wrote = [line for line in out.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1
    named = {name.strip() for name in wrote[0][len("wrote "):].replace(f"{run_copy}/", "").split(",")}
    assert changed == named == {"metrics_validation.json", "predictions_validation.npz", "roc_validation.png"}
    assert json.loads((run_copy / "metrics_validation.json").read_text())["run_id"] == run_ids(run_copy)["run.json"]


def test_stale_temporaries_are_removed_at_the_next_start(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = run / f".checkpoint.pt.{'a' * 32}{TEMPORARY_MARK}"
    stale.write_bytes(b"half a checkpoint")
    with open_run(run, "new") as opened:
        assert not stale.exists()
        opened.finish()
    assert json.loads((run / RUN_FILE).read_text())["status"] == "finished"


# --------------------------------------------------------------------------- no foreign code


@pytest.mark.parametrize("command", ["evaluate", "predict", "resume"])
def test_a_run_naming_foreign_code_is_not_imported_without_trust_code(run_copy, tmp_path, monkeypatch, capsys,
                                                                      command):
    marker = tmp_path / "imported"
    name = f"planted_{command}"  # one module a case: resolve() leaves each case's folder on sys.path
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\nGuide = 42\n")
    monkeypatch.chdir(tmp_path)  # resolve() searches the current folder
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    config["model"]["guide"] = f"{name}:Guide"
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config))
    before = snapshot(run_copy)
    argv = {"evaluate": ["evaluate", "--run", run_copy], "predict": ["predict", "--run", run_copy, "x.png"],
            "resume": ["train", "--resume", run_copy]}[command]
    code, _, err = cli(argv, capsys)
    line = one_line(err)
    assert code == 2 and f"model.guide: '{name}:Guide' would import module '{name}'" in line
    assert "--trust-code" in line and not marker.exists() and name not in sys.modules
    assert snapshot(run_copy) == before
    code, _, err = cli([*argv, "--trust-code"], capsys)  # trusted: imported (and refused as no nn.Module class)
    assert code == 2 and marker.exists() and "is not an nn.Module class" in one_line(err)
    sys.modules.pop(name, None)


# --------------------------------------------------------------------------- the file system and resources


def test_out_that_is_a_file_read_only_folder_and_unwritable_cache(tmp_path, config_file, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine\n")
    code, _, err = cli(["train", "--config", config_file, "--out", a_file], capsys)
    assert code == 2 and f"{a_file}: is a file, not a run folder" in one_line(err)
    assert a_file.read_text() == "mine\n"

    code, _, err = cli(["train", "--config", config_file, "--out", tmp_path / "run", f"cache_dir={a_file}"], capsys)
    assert code == 2 and f"cache_dir: {a_file}: cannot create the folder" in one_line(err)

    locked = tmp_path / "read-only"
    with read_only(locked):
        code, _, err = cli(["train", "--config", config_file, "--out", locked], capsys)
        assert code == 2 and f"{locked}: cannot write in the run folder" in one_line(err)
        cache = tmp_path / "read-only-cache"
        with read_only(cache):
            code, _, err = cli(["train", "--config", config_file, "--out", tmp_path / "run2", f"cache_dir={cache}"],
                               capsys)
            assert code == 2 and f"cache_dir: {cache}: the folder is not writable" in one_line(err)
    assert list(locked.iterdir()) == []


def test_a_read_only_run_folder_is_one_line_for_evaluate(run_copy, capsys):
    before = snapshot(run_copy)
    with read_only(run_copy):
        code, _, err = cli(["evaluate", "--run", run_copy], capsys)
    assert code == 2 and f"{run_copy}: cannot write in the run folder" in one_line(err)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_too_many_monte_carlo_samples_is_one_line_with_the_memory_needed(run_copy, tmp_path, capsys, command):
    from PIL import Image
    image = tmp_path / "x.png"
    Image.new("L", (32, 32), 128).save(image)
    before = snapshot(run_copy)
    argv = ["evaluate", "--run", run_copy] if command == "evaluate" else ["predict", "--run", run_copy, image]
    code, _, err = cli([*argv, "--samples", str(10**9), "--device", "cpu"], capsys)
    line = one_line(err)
    assert code == 2 and f"--samples {10**9}: a batch of " in line and "GiB available; lower --samples" in line
    assert snapshot(run_copy) == before


# --------------------------------------------------------------------------- sweeps check what they reuse


def test_sweep_reuses_a_finished_run_only_with_the_same_config(tmp_path, config_file, capsys):
    out = tmp_path / "sweep"
    base = ["sweep", "--config", config_file, "--grid", "inference.prior_samples=1", "--out", out]
    code, _, err = cli([*base, "train.lr=0.002"], capsys)
    assert code == 0, err
    run = out / "runs" / "inference.prior_samples=1-seed0"
    before = snapshot(out)
    code, _, err = cli([*base, "train.lr=0.01"], capsys)
    line = one_line(err)
    assert code == 2 and f"{run}: holds a run with other settings (train.lr: 0.002 there, 0.01 now)" in line
    assert snapshot(out) == before
    assert "train.lr=0.002" in (out / "sweep.md").read_text()

    code, out_text, err = cli([*base, "train.lr=0.01", "--overwrite"], capsys)
    assert code == 0, err
    assert "had other settings; moved its files into" in out_text
    assert load_config(run / "config.yaml").train.lr == 0.01
    table = (out / "sweep.md").read_text()
    assert "train.lr=0.01" in table and "0.002" not in table  # the notes come from the recorded configs
    assert "overrides:" not in table


# --------------------------------------------------------------------------- two processes, one folder


def test_two_train_processes_into_one_folder_one_refuses_the_other_finishes(tmp_path, config_file):
    """Fault injection: two `vkd-pyro train` started into the same folder at once."""
    out = tmp_path / "shared"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "vkd_pyro", "train", "--config", str(config_file), "--out", str(out),
            "train.max_epochs=1"]
    processes = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
                 for _ in range(2)]
    results = [(p.pid, *p.communicate(timeout=120), p.returncode) for p in processes]
    codes = sorted(code for *_, code in results)
    assert codes == [0, 2], results
    winner = next(r for r in results if r[3] == 0)
    loser = next(r for r in results if r[3] == 2)
    line = one_line(loser[2])
    # the usual case: refused while the other holds the lock (named); or, if it started after the
    # other had finished, refused because the folder holds that run
    assert (f"another process is writing this run folder (pid {winner[0]} on host" in line
            or f"{out}: holds run " in line), line
    ids = run_ids(out)
    assert len(set(ids.values())) == 1, ids  # the winner's weights, metrics and record
    record = json.loads((out / RUN_FILE).read_text())
    assert record["pid"] == winner[0] and record["status"] == "finished"


def test_the_resume_hint_is_shell_quoted(tmp_path, config_file, capsys):
    run = tmp_path / "my run; rm -rf x"
    code, _, err = cli(["train", "--config", config_file, "--out", run, "train.stop_after_steps=2"], capsys)
    assert code == 143
    assert err.strip().splitlines()[-1].endswith(f"resume with: vkd-pyro train --resume '{run}'")
    assert json.loads((run / RUN_FILE).read_text())["status"] == "interrupted"


def test_an_undefined_validation_auc_is_one_warning_naming_the_classes(finished):
    log = (finished / "run.log").read_text()
    warnings = [line for line in log.splitlines() if "has one label value only for" in line]
    assert len(warnings) == 1 and "their AUC is undefined" in warnings[0]
    assert "Pneumothorax" in warnings[0] or "Fracture" in warnings[0]
