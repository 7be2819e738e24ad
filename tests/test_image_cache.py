"""Decoding X-ray files once into the on-disk image cache: what a decoded image is, and when the cache
is reused or rebuilt."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from vkd_pyro import files as vkd_files
from vkd_pyro.data import image_cache
from vkd_pyro.data.image_cache import BadImage, cache_path, decode_image, load_or_decode


def _gradient(h, w):
    return np.add.outer(np.arange(h), np.arange(w)).astype(np.float64) / (h + w - 2)


def test_decode_is_grey_resized_like_predict(tmp_path):
    grey = (_gradient(40, 60) * 255).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    expected = np.asarray(Image.fromarray(grey).resize((16, 16), Image.BILINEAR))
    assert np.array_equal(decode_image(tmp_path / "g.png", 16), expected)
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    Image.fromarray(rgba).save(tmp_path / "c.png")
    assert np.abs(decode_image(tmp_path / "c.png", 16).astype(int) - expected).max() <= 1


def test_sixteen_bit_images_are_scaled_by_their_bit_depth(tmp_path):
    values = (100 + _gradient(32, 32) * 3000).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    Image.fromarray(values).save(tmp_path / "x.png")
    out = decode_image(tmp_path / "x.png", 32)
    assert out.dtype == np.uint8 and out.min() == round(100 * 255 / 4095) and out.max() == round(3100 * 255 / 4095)
    assert np.abs(out.astype(float) - values * (255 / 4095)).max() <= 1.0
    Image.fromarray((values * 16).astype(np.uint16)).save(tmp_path / "full.png")  # the same data using 16 bits
    assert np.abs(decode_image(tmp_path / "full.png", 32).astype(int) - out).max() <= 1


def test_large_jpegs_are_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    big = (_gradient(1024, 896) * 255).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    sizes = []
    real_resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, *a, **k: sizes.append(self.size) or real_resize(self, *a, **k))
    out = decode_image(tmp_path / "big.jpg", 64)
    assert out.shape == (64, 64) and sizes == [(224, 256)]  # 1/4 scale: the least that keeps >= 128 px
    full = np.asarray(Image.fromarray(big).resize((64, 64), Image.BILINEAR)).astype(int)
    assert np.abs(out.astype(int) - full).mean() < 2.0


@pytest.mark.parametrize("damage, reason", [("missing", "image file missing"),
                                            ("garbage", "unreadable image (corrupt or truncated)"),
                                            ("truncated", "unreadable image (corrupt or truncated)")])
def test_bad_files_raise_with_a_reason(tmp_path, damage, reason):
    path = tmp_path / "x.jpg"
    Image.fromarray((np.random.default_rng(0).random((200, 200)) * 255).astype(np.uint8)).save(path, quality=90)
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"\x89PNG not really")
    else:
        path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(BadImage) as error:
        decode_image(path, 32)
    assert error.value.reason == reason


@pytest.fixture
def files(tmp_path):
    paths = []
    for i in range(12):
        path = tmp_path / "img" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(((_gradient(24, 20) * 200) + i).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_the_cache_is_reused_and_rebuilt_when_a_file_changes(files, tmp_path, monkeypatch):
    bad = []
    first = load_or_decode(files, 16, tmp_path / "c", "t", lambda *a: bad.append(a))
    assert isinstance(first, np.memmap) and first.shape == (12, 16, 16) and not bad
    assert cache_path(tmp_path / "c", "t", files, 16).is_file()
    calls = []
    real = image_cache._decode_job
    monkeypatch.setattr(image_cache, "_decode_job", lambda job: calls.append(job) or real(job))
    again = load_or_decode(files, 16, tmp_path / "c", "t", lambda *a: None)
    assert calls == [] and np.array_equal(again, first)
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(files[4])  # a new file under the same name
    os.utime(files[4], ns=(1, 1))
    changed = load_or_decode(files, 16, tmp_path / "c", "t", lambda *a: None)
    assert len(calls) == 12 and (changed[4] == 0).all() and np.array_equal(changed[5], first[5])
    load_or_decode(files, 20, tmp_path / "c", "t", lambda *a: None)  # another size: another cache
    assert len(list((tmp_path / "c" / "images").glob("*.npy"))) == 3


def test_worker_processes_decode_the_same_pixels(files, tmp_path):
    Image.fromarray(np.zeros(3, np.uint8)).save(files[7])
    open(files[9], "wb").close()
    serial_bad, parallel_bad = [], []
    serial = load_or_decode(files, 16, None, "t", lambda *a: serial_bad.append(a[:2]))
    parallel = load_or_decode(files, 16, tmp_path / "c", "t", lambda *a: parallel_bad.append(a[:2]), workers=2)
    assert np.array_equal(serial, parallel)
    assert serial_bad == parallel_bad == [(9, "unreadable image (corrupt or truncated)")]


def test_an_error_leaves_no_cache_behind(files, tmp_path):
    open(files[2], "wb").close()

    def refuse(index, reason, detail):
        raise RuntimeError(f"bad {index}")

    with pytest.raises(RuntimeError, match="bad 2"):
        load_or_decode(files, 16, tmp_path / "c", "t", refuse)
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]


def test_the_cache_is_written_atomically(files, tmp_path, monkeypatch):
    """The array and its .json go through vkd_pyro.files.atomic_path: each fsynced, then renamed into
    place; no temporary file is left."""
    synced = []
    real_fsync = vkd_files._fsync_file
    monkeypatch.setattr(vkd_files, "_fsync_file", lambda path: synced.append(path.name) or real_fsync(path))
    load_or_decode(files, 16, tmp_path / "c", "t", lambda *a: None)
    target = cache_path(tmp_path / "c", "t", files, 16)
    meta = target.with_suffix(".json")
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([target.name, meta.name])
    assert len(synced) == 2 and synced[0].startswith(f".{meta.name}.")  # the .json lands first,
    assert synced[1].startswith(f".{target.name}.")  # then the array


@pytest.mark.parametrize("damage", ["truncated array", "garbage array", "wrong dtype", "garbage json",
                                    "json of another format", "malformed bad list", "json missing"])
def test_a_corrupt_cache_entry_is_rebuilt_with_a_warning(files, tmp_path, damage):
    first = np.array(load_or_decode(files, 16, tmp_path / "c", "t", lambda *a: None))
    target = cache_path(tmp_path / "c", "t", files, 16)
    meta = target.with_suffix(".json")
    if damage == "truncated array":
        target.write_bytes(target.read_bytes()[:500])
    elif damage == "garbage array":
        target.write_bytes(b"not an npy file at all")
    elif damage == "wrong dtype":
        np.save(target, first.astype(np.float64))
    elif damage == "garbage json":
        meta.write_text("{not json")
    elif damage == "json of another format":
        meta.write_text('{"format": "xray-images-0", "bad": []}')
    elif damage == "malformed bad list":
        meta.write_text(json.dumps({"format": image_cache.CACHE_FORMAT, "bad": [[99, "x", "y"]]}))
    else:
        meta.unlink()
    with pytest.warns(image_cache.CorruptCacheWarning, match=f"{target}: corrupt image cache entry"):
        again = load_or_decode(files, 16, tmp_path / "c", "t", lambda *a: pytest.fail("no bad files"))
    assert np.array_equal(again, first) and again.dtype == np.uint8
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt: the next load is a clean cache hit
        assert np.array_equal(load_or_decode(files, 16, tmp_path / "c", "t", lambda *a: None), first)
