"""Bad config files through the real command line (`python -m vkd_pyro train --config BAD`, a
subprocess): one line naming the file and key, exit status 2, no traceback, and every file that
existed before is byte-for-byte unchanged (nothing new is written either).

The messages themselves are checked kind by kind in tests/test_config.py; this is the end-to-end
contract of the command, one subprocess per kind of mistake.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.test_cli_bad_input import one_error_line

REPO = Path(__file__).resolve().parents[1]
LAUGHS = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "x"] * 10) + "]\n" for i in range(9))
VALID = "data:\n  max_reports: 40\n  image_size: 32\nmodel:\n  z_dim: 16\n  hidden: [16]\n"

# (kind, config file content (bytes or text; None: the path is a folder), words the one line holds)
KINDS = [
    ("list", "- train\n- model\n", "bad.yaml: (top level): expected a mapping of sections"),
    ("scalar", "42\n", "bad.yaml: (top level): expected a mapping of sections"),
    ("duplicate key", "train:\n  lr: 0.1\n  lr: 0.2\n", "bad.yaml: train.lr: duplicate key"),
    ("binary", bytes(range(256)), "bad.yaml: a binary file, not a YAML config"),
    ("not UTF-8", "seed: 1  # caf\xe9\n".encode("latin-1"), "bad.yaml: not UTF-8 text"),
    ("int overflow", "train:\n  max_epochs: 100000000000000000000000000000\n",
     "bad.yaml: train.max_epochs: 100000000000000000000000000000 does not fit in a 64-bit integer"),
    ("nan", "train:\n  lr: .nan\n", "bad.yaml: train.lr: nan is not a finite number"),
    ("inf", "data:\n  signal: .inf\n", "bad.yaml: data.signal: inf is not a finite number"),
    ("seed", "seed: 4294967296\n", "bad.yaml: seed: 4294967296 must be in 0..4294967295"),
    ("split seed", "data:\n  split_seed: -1\n", "bad.yaml: data.split_seed: -1 must be in 0..4294967295"),
    ("billion laughs", LAUGHS, "bad.yaml: l3: YAML aliases expand to more than 10000 values"),
    ("folder", None, "bad.yaml: is a folder, not a config file"),
]


def snapshot(root: Path) -> dict:
    """Every file under `root`: relative path -> (bytes, mtime_ns)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_train(tmp_path: Path, config: Path, **env_changes) -> tuple[int, str]:
    """`python -m vkd_pyro train --config CONFIG --out <existing run folder>` in tmp_path; (status, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HOME": str(tmp_path / "home"), "VKD_PYRO_CACHE": str(tmp_path / "cache"),
           # matplotlib's font cache (built on first import) lives outside the folder under test
           "MPLCONFIGDIR": str(Path(tempfile.gettempdir()) / "vkd-pyro-tests-matplotlib"), **env_changes}
    done = subprocess.run([sys.executable, "-m", "vkd_pyro", "train", "--config", str(config),
                           "--out", str(tmp_path / "run")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    return done.returncode, done.stderr


@pytest.fixture
def workspace(tmp_path):
    """A folder with an earlier run, a cache and a home folder that a refused config must not touch."""
    for name, text in [("run/config.yaml", VALID), ("run/metrics.json", "{}\n"), ("cache/images/x.json", "{}\n"),
                       ("home/.keep", "")]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("kind, content, words", KINDS, ids=[k[0] for k in KINDS])
def test_a_bad_config_file_is_one_line_and_status_2_and_touches_nothing(workspace, kind, content, words):
    config = workspace / "bad.yaml"
    if content is None:
        config.mkdir()
    elif isinstance(content, bytes):
        config.write_bytes(content)
    else:
        config.write_text(content)
    before = snapshot(workspace)
    code, err = run_train(workspace, config)
    assert code == 2, err
    assert words in one_error_line(err)
    assert snapshot(workspace) == before


def test_an_empty_cache_variable_is_one_line_and_status_2(workspace):
    config = workspace / "good.yaml"
    config.write_text(VALID)
    before = snapshot(workspace)
    code, err = run_train(workspace, config, VKD_PYRO_CACHE="")
    assert code == 2, err
    assert "VKD_PYRO_CACHE: the environment variable is set but empty" in one_error_line(err)
    assert snapshot(workspace) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root reads files whatever their mode; tests/test_config.py covers this case")
def test_an_unreadable_config_file_is_one_line_and_status_2(workspace):
    config = workspace / "locked.yaml"
    config.write_text(VALID)
    config.chmod(0)
    try:
        before = snapshot(workspace / "run")
        code, err = run_train(workspace, config)
    finally:
        config.chmod(0o644)
    assert code == 2, err
    assert "locked.yaml: config file cannot be read (Permission denied)" in one_error_line(err)
    assert snapshot(workspace / "run") == before
