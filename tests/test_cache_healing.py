"""Caches heal and say so: an unusable cache entry (the phantom images, the text feature store) is
rebuilt with a `CorruptCacheWarning` naming its file, whatever the offset of the damage, and no
dependency (torchxrayvision) silences that warning in a process that imports vkd-pyro."""

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import vkd_pyro.data.openi_phantom as op
from tests.test_text_store import MAX_TOKENS, TEXTS, CountingEncoder, check, store_in
from vkd_pyro.data.image_cache import CorruptCacheWarning
from vkd_pyro.data.text_store import ARRAY_FILE, INDEX_FILE, META_FILE, store_folder

ROOT = Path(__file__).resolve().parents[1]
PHANTOMS = {"max_reports": 12, "image_size": 16}


def phantom_file(cache: Path) -> Path:
    """The one phantom cache entry under `cache`."""
    (path,) = (cache / "phantom").glob("*.npy")
    return path


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """(the images of a first build, its cache entry's name and bytes)."""
    cache = tmp_path_factory.mktemp("phantom-cache")
    images = op.OpenIPhantomDataset(cache_dir=cache, **PHANTOMS).images
    path = phantom_file(cache)
    return np.array(images), path.name, path.read_bytes()


def damage_npy(path: Path, data: bytes, first: np.ndarray, damage: str) -> None:
    """Write at `path` the cache entry `data` (an .npy file's bytes, holding `first`) after `damage`."""
    if damage.startswith("truncated at "):
        path.write_bytes(data[:int(damage.split()[-1])])
    elif damage == "garbage":
        path.write_bytes(b"\x93NUMPY but not really" * 20)
    elif damage == "zip archive":
        path.write_bytes(b"PK\x03\x04" + data)
    elif damage == "float64 array":
        np.save(path, first.astype(np.float64))
    else:  # another shape
        np.save(path, first[:5])


@pytest.mark.parametrize("damage", ["truncated at 0", "truncated at 10", "truncated at 128", "truncated at 2000",
                                    "truncated at -1", "garbage", "zip archive", "float64 array", "other shape"])
def test_a_corrupt_phantom_cache_entry_is_rendered_again_with_a_warning(phantoms, tmp_path, monkeypatch, damage):
    first, name, data = phantoms
    path = tmp_path / "cache" / "phantom" / name
    path.parent.mkdir(parents=True)
    damage_npy(path, data, first, damage)
    with pytest.warns(CorruptCacheWarning) as caught:
        again = op.OpenIPhantomDataset(cache_dir=tmp_path / "cache", **PHANTOMS).images
    (message,) = [str(w.message) for w in caught if issubclass(w.category, CorruptCacheWarning)]
    assert re.fullmatch(f"{re.escape(str(path))}: corrupt image cache entry \\(.+\\); "
                        "rendering the 12 phantoms again to rebuild it", message), message
    assert np.array_equal(again, first) and again.dtype == np.uint8
    monkeypatch.setattr(op, "render_reports", lambda *a, **k: pytest.fail("rendered again despite the rebuilt cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # healed: the next build is a clean cache hit
        assert np.array_equal(op.OpenIPhantomDataset(cache_dir=tmp_path / "cache", **PHANTOMS).images, first)


def damage_store_file(path: Path, data: bytes, offset: int, damage: str) -> None:
    """Write at `path` the store file `data` truncated at `offset`, or with garbage from `offset` on."""
    garbage = bytes((7 * i + 101) % 256 for i in range(len(data) - offset))
    path.write_bytes(data[:offset] + (garbage if damage == "garbage from" else b""))


@pytest.mark.parametrize("name, damage", [(ARRAY_FILE, "truncated at"), (INDEX_FILE, "truncated at"),
                                          (INDEX_FILE, "garbage from"), (META_FILE, "truncated at"),
                                          (META_FILE, "garbage from")])
def test_a_damaged_text_store_is_rebuilt_with_a_warning_naming_the_file_at_any_offset(tmp_path, name, damage):
    """Each offset (every 1/40 of the file, and its last byte): one CorruptCacheWarning that starts
    with the damaged file, every text encoded again, the states right. (Garbage of the right length
    inside states.f16 is not detectable: the store keeps no checksum.)"""
    store_in(tmp_path / "whole").get_or_compute(CountingEncoder(), TEXTS, chunk=10)
    whole = store_folder(tmp_path / "whole", CountingEncoder.identity, MAX_TOKENS)
    data = (whole / name).read_bytes()
    for offset in sorted(set(range(0, len(data), max(1, len(data) // 40))) | {len(data) - 1}):
        cache = tmp_path / f"{offset}"
        folder = store_folder(cache, CountingEncoder.identity, MAX_TOKENS)
        shutil.copytree(whole, folder)
        damage_store_file(folder / name, data, offset, damage)
        encoder = CountingEncoder()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            view, report = store_in(cache).get_or_compute(encoder, TEXTS)
        messages = [str(w.message) for w in caught if issubclass(w.category, CorruptCacheWarning)]
        assert len(messages) == 1 and messages[0].startswith(f"{folder / name} "), (offset, messages)
        assert messages[0].endswith(f"; rebuilding the text feature store {folder}") and "\n" not in messages[0]
        assert report.reports == len(TEXTS) and sorted(encoder.encoded) == sorted(TEXTS)
        check(view, TEXTS)


# No dependency silences vkd-pyro's warnings -----------------------------------------------------------

#: The modules of vkd-pyro that import torchxrayvision (directly, and through the API).
XRV_IMPORTERS = "import vkd_pyro.encoders.image, vkd_pyro.analysis.runs"


def python(code: str, *args) -> subprocess.CompletedProcess:
    """`code` run by this interpreter in a fresh process from the repository, without inherited
    warning options (PYTHONWARNINGS)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_warnings_reach_stderr_after_importing_torchxrayvision():
    done = python(f"{XRV_IMPORTERS}\n"
                  "import sys, warnings\n"
                  "from vkd_pyro.data.image_cache import CorruptCacheWarning\n"
                  "assert 'torchxrayvision' in sys.modules\n"
                  "warnings.warn('canary.npy: corrupt image cache entry', CorruptCacheWarning)\n"
                  "warnings.warn('a plain UserWarning')\n")
    assert done.returncode == 0, done.stderr
    assert "CorruptCacheWarning: canary.npy: corrupt image cache entry" in done.stderr
    assert "UserWarning: a plain UserWarning" in done.stderr


def test_a_filter_set_before_importing_torchxrayvision_survives_it():
    """The filters of before the import are all there after it, with those the imported packages
    add for their own warning classes, and none that ignores every warning."""
    done = python("import warnings\n"
                  "from vkd_pyro.data.image_cache import CorruptCacheWarning\n"
                  "warnings.simplefilter('error', CorruptCacheWarning)\n"
                  "before = warnings.filters[:]\n"
                  f"{XRV_IMPORTERS}\n"
                  "assert warnings.filters[-len(before):] == before and len(warnings.filters) > len(before)\n"
                  "assert not [f for f in warnings.filters if f[0] == 'ignore' and f[2] in (Warning, UserWarning)\n"
                  "            and f[1] is None and f[3] is None]\n"
                  "warnings.warn('canary.npy: corrupt image cache entry', CorruptCacheWarning)\n")
    assert done.returncode == 1 and done.stderr.rstrip().endswith(
        "CorruptCacheWarning: canary.npy: corrupt image cache entry"), done.stderr


def test_a_phantom_cache_rebuild_is_seen_on_stderr(phantoms, tmp_path):
    """A process that imported torchxrayvision (through vkd-pyro) builds a dataset over a truncated
    phantom cache entry: the warning naming the file is on its stderr, the images are the first build's."""
    first, name, data = phantoms
    path = tmp_path / "cache" / "phantom" / name
    path.parent.mkdir(parents=True)
    path.write_bytes(data[:len(data) // 2])
    done = python(f"{XRV_IMPORTERS}\n"
                  "import sys, numpy as np\n"
                  "from vkd_pyro.data.openi_phantom import OpenIPhantomDataset\n"
                  "np.save(sys.argv[2], OpenIPhantomDataset(max_reports=12, image_size=16, cache_dir=sys.argv[1]).images)\n",
                  tmp_path / "cache", tmp_path / "rebuilt.npy")
    assert done.returncode == 0, done.stderr
    assert f"CorruptCacheWarning: {path}: corrupt image cache entry (unreadable array: " in done.stderr
    assert "rendering the 12 phantoms again to rebuild it" in done.stderr
    assert np.array_equal(np.load(tmp_path / "rebuilt.npy"), first)
    assert np.array_equal(np.load(path), first)  # the entry itself is healed
