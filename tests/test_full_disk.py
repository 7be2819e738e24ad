"""A full disk or a failed write leaves a state the next command can use (issue #19, class 3).

A write the file system refuses is one line naming the file, status 2; run.json says `failed` with
the reason (or the line says that run.json could not be written either); no temporary or partial
file is left in the run folder or in a cache; and once there is room, `train --resume` finishes the
run (from the beginning when it had no last.pt yet). `predict --csv` into a folder that does not
exist, or onto a folder, is one line naming the path.

Where the machine allows it (root, `mount`), a small tmpfs is the full disk: the run folder on it,
the cache on it (VKD_PYRO_CACHE), the image cache on it; it is then made larger for the next run.
Everywhere, a write is made to fail with ENOSPC by monkeypatching (a checkpoint, run.json, a commit
of the text feature store).
"""

import errno
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vkd_pyro.data.text_store as text_store
import vkd_pyro.training.run_folder as run_folder
from tests.test_run_folder import cli
from tests.test_run_folder import one_line as error_line
from tests.test_text_store import TEXTS, CountingEncoder, check, store_in
from tests.tiny_runs import tiny_overrides, write_config_file
from vkd_pyro.config import config_from_dict
from vkd_pyro.data.image_cache import cache_path, decode_image, load_or_decode
from vkd_pyro.data.text_store import ARRAY_FILE, META_FILE, TextFeatureStore, store_folder
from vkd_pyro.files import TEMPORARY_MARK, atomic_path
from vkd_pyro.training.loop import fit

TINY = tiny_overrides({"image_encoder.width": 4, "image_encoder.out_features": 16, "text_encoder.block_heads": None,
                       "text_encoder.block_ffn": None, "train.batch_size": 8})
NO_SPACE = os.strerror(errno.ENOSPC)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The cache shared with the other tests of tiny runs."""
    return tmp_path_factory.getbasetemp() / "objectives-cache"


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, cache):
    return write_config_file(tmp_path_factory.mktemp("config") / "tiny.yaml", TINY + [f"cache_dir={cache}"])


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a new folder on a tmpfs of that size; skipped where mounting is not allowed."""
    mounted = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a small tmpfs needs root and mount (the monkeypatched cases run everywhere)")
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def grow(disk: Path, size: str = "32m") -> None:
    """Make room: the tmpfs at `disk` becomes `size`."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)


def one_line(err: str) -> str:
    """The one error line, without its "vkd-pyro: error: " prefix."""
    return error_line(err).removeprefix("vkd-pyro: error: ")


def record(run: Path) -> dict:
    return json.loads((run / run_folder.RUN_FILE).read_text())


def temporaries(folder: Path) -> list:
    return [str(p) for p in folder.rglob("*") if TEMPORARY_MARK in p.name]


def check_failed(run: Path, line: str, path: Path, status: str = "failed") -> str:
    """The line names `path` and says how to go on; run.json `failed` naming it (or `status`, as it
    was); no temporary left in the run folder; returns the run id."""
    assert line.startswith(f"{path}: {NO_SPACE}; make room, then continue the run with: "
                           f"vkd-pyro train --resume {run}"), line
    found = record(run)
    assert found["status"] == status, found
    if status == "failed":
        assert found["reason"] == f"OSError: {path}: {NO_SPACE}", found
    assert not temporaries(run)
    return found["run_id"]


def check_resumed(run: Path, run_id: str, capsys) -> None:
    code, _, err = cli(["train", "--resume", run], capsys)
    assert code == 0, err
    found = record(run)
    assert found["status"] == "finished" and found["run_id"] == run_id and found["resumed"] == 1


# --------------------------------------------------------------------------- a full tmpfs


def test_a_run_folder_on_a_full_disk(small_disk, config_file, capsys):
    """--out on a 128 KiB tmpfs: the config, run.json, run.log and history.csv fit, checkpoint.pt
    does not; its temporary is emptied and removed, so run.json can still say `failed`."""
    disk = small_disk("128k")
    run = disk / "run"
    code, _, err = cli(["train", "--config", config_file, "--out", run], capsys)
    line = one_line(err)
    assert code == 2 and line.startswith(f"{run}/"), line
    path = Path(line.split(": ")[0])  # checkpoint.pt where pages are 4 KiB
    run_id = check_failed(run, line, path)
    assert not path.exists()
    grow(disk)
    check_resumed(run, run_id, capsys)
    assert not temporaries(run)


def test_a_cache_on_a_full_disk(small_disk, tmp_path, capsys, monkeypatch):
    """VKD_PYRO_CACHE on a 1 MiB tmpfs: the phantoms fit (60 KiB), the report states (3 MiB) do not.
    What is left in the cache is whole: the phantom array, the text store's meta.json and an empty
    states.f16 (the chunk cut off), no index, no temporary."""
    disk = small_disk("1m")
    monkeypatch.setenv("VKD_PYRO_CACHE", str(disk))
    config = write_config_file(tmp_path / "tiny.yaml", TINY)
    run = tmp_path / "run"
    code, _, err = cli(["train", "--config", config, "--out", run], capsys)
    stores = list((disk / "text").iterdir())
    assert code == 2 and len(stores) == 1
    run_id = check_failed(run, one_line(err), stores[0] / ARRAY_FILE)

    assert not temporaries(disk)
    assert sorted(p.name for p in stores[0].iterdir()) == sorted([ARRAY_FILE, META_FILE, "lock"])
    assert (stores[0] / ARRAY_FILE).stat().st_size == 0
    meta = json.loads((stores[0] / META_FILE).read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a consistent store: opened without a rebuild
        assert len(TextFeatureStore(stores[0], meta["identity"], meta["max_tokens"], meta["width"])) == 0
    phantoms = list((disk / "phantom").iterdir())
    assert len(phantoms) == 1 and np.load(phantoms[0]).shape == (60, 32, 32)

    grow(disk)
    check_resumed(run, run_id, capsys)


def test_an_image_cache_on_a_full_disk(small_disk, tmp_path):
    """Decoded images that do not fit: an OSError naming the .npy before any image is decoded (its
    blocks are reserved first: a memmap on a full tmpfs would end the process with SIGBUS), and
    neither the array nor its .json is left."""
    disk = small_disk("128k")
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((64, 64), 40 * i, np.uint8)).save(files[-1])
    target = cache_path(disk, "t", files, 256)  # 3 x 256 x 256 bytes: 192 KiB
    with pytest.raises(OSError) as raised:
        load_or_decode(files, 256, disk, "t", lambda *a: None)
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(target))
    assert [p.name for p in disk.rglob("*")] == ["images"]
    grow(disk, "1m")
    images = load_or_decode(files, 256, disk, "t", lambda *a: None)
    assert np.array_equal(images[2], decode_image(files[2], 256))


# --------------------------------------------------------------------------- a write made to fail


@pytest.mark.parametrize("failing", ["checkpoint.pt", "last.pt", "checkpoint.pt and run.json"])
def test_a_refused_checkpoint_write(tmp_path, config_file, capsys, monkeypatch, failing):
    """torch.save fails with ENOSPC (half a file written) for one checkpoint; with `run.json` the
    record of the failure cannot be written either, and the line says so. The resume starts over:
    no last.pt was written."""
    name = failing.split()[0]
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(f).name.startswith(f".{name}."):  # the temporary file of `name`
            Path(f).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, NO_SPACE)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    if failing.endswith("run.json"):
        real_write = run_folder.write_json

        def write_json(path, obj):
            if Path(path).name == run_folder.RUN_FILE and obj["status"] != "running":
                raise OSError(errno.ENOSPC, NO_SPACE, str(path))
            real_write(path, obj)

        monkeypatch.setattr(run_folder, "write_json", write_json)
    run = tmp_path / "run"
    code, _, err = cli(["train", "--config", config_file, "--out", run], capsys)
    line = one_line(err)
    assert code == 2
    lost = failing.endswith("run.json")
    if lost:
        assert line.endswith(f"; {run / run_folder.RUN_FILE}: could not be written either ({NO_SPACE}); "
                             "it still says running"), line
    run_id = check_failed(run, line, run / name, "running" if lost else "failed")
    assert (run / "checkpoint.pt").exists() == (name == "last.pt") and not (run / "last.pt").exists()
    monkeypatch.undo()
    check_resumed(run, run_id, capsys)


def test_a_refused_commit_of_the_text_store(tmp_path, monkeypatch):
    """The second chunk's index cannot be written: the store keeps the first chunk, its array cut
    back to that chunk's rows (every file whole, no temporary); the next run encodes the rest only."""
    commits = []
    real_write = text_store.write_bytes

    def write_bytes(path, data):
        if Path(path).name == text_store.INDEX_FILE:
            commits.append(path)
            if len(commits) == 2:
                raise OSError(errno.ENOSPC, NO_SPACE, str(path))
        real_write(path, data)

    monkeypatch.setattr(text_store, "write_bytes", write_bytes)
    folder = store_folder(tmp_path, CountingEncoder.identity, 16)
    with pytest.raises(OSError) as raised:
        store_in(tmp_path).get_or_compute(CountingEncoder(), TEXTS, chunk=4)
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(folder / text_store.INDEX_FILE))
    monkeypatch.undo()
    store = store_in(tmp_path)
    assert len(store) == 4 and not temporaries(folder)
    assert (folder / ARRAY_FILE).stat().st_size == store.committed_rows * store.row_bytes
    rest = CountingEncoder()
    view, _ = store.get_or_compute(rest, TEXTS, chunk=4)
    assert sorted(rest.encoded) == sorted(TEXTS[4:])
    check(view, TEXTS)


def test_a_failed_write_names_its_target_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(OSError) as raised:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, NO_SPACE)  # as a write(2) says it: no file name
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(target))
    with pytest.raises(RuntimeError, match="a writer's own error"):  # not a full disk: left as it is
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("a writer's own error")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- predict --csv


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache):
    folder = tmp_path_factory.mktemp("finished") / "run"
    fit(config_from_dict({}, "tiny", TINY + [f"cache_dir={cache}"]), folder, progress=False)
    return folder


def test_predict_csv_into_a_missing_folder_or_onto_a_folder(finished, tmp_path, capsys, monkeypatch):
    from vkd_pyro.analysis.runs import Run

    def never(*args, **kwargs):
        raise AssertionError("predicted before the --csv target was checked")

    monkeypatch.setattr(Run, "predict", never)  # refused before anything is predicted
    image = tmp_path / "x.png"
    Image.new("L", (32, 32), 128).save(image)
    missing = tmp_path / "missing" / "p.csv"
    code, _, err = cli(["predict", "--run", finished, image, "--csv", missing], capsys)
    assert code == 2 and one_line(err) == f"{missing}: its folder {missing.parent} does not exist"
    code, _, err = cli(["predict", "--run", finished, image, "--csv", tmp_path], capsys)
    assert code == 2 and one_line(err) == f"{tmp_path}: is a folder, not a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_a_run_log_that_cannot_be_written_is_one_warning_and_the_console_goes_on(tmp_path, capsys):
    from vkd_pyro import logs

    with logs.run_log(tmp_path) as path:
        handler = next(h for h in logs.LOGGER.handlers if getattr(h, "baseFilename", None) == str(path))

        def full(*args):
            raise OSError(errno.ENOSPC, "No space left on device")

        handler.stream.write = full
        logs.info("first line")
        logs.info("second line")
    captured = capsys.readouterr()
    assert captured.out == "first line\nsecond line\n"
    assert captured.err == (f"vkd-pyro: warning: {path}: could not be written (No space left on device); "
                            "the log goes on on the console only\n")
    assert handler not in logs.LOGGER.handlers
