"""The embedded openi_phantom dataset: real reports, their labels, rendered and cached images."""

import numpy as np
import pytest
import torch

import vkd_pyro.data.openi_phantom as op
from vkd_pyro import files as vkd_files
from vkd_pyro.data.decode import to_unit_float
from vkd_pyro.data.labels import label_vector
from vkd_pyro.data.openi_reports import read_reports
from vkd_pyro.data.records import XRayDataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return op.OpenIPhantomDataset(image_size=32, max_reports=40, cache_dir=tmp_path_factory.mktemp("cache"))


def test_reports_without_text_are_counted_and_left_out(dataset):
    assert dataset.skipped == {"no FINDINGS or IMPRESSION text": 28}
    assert all(text.strip() for text in dataset.texts)
    assert len(dataset) == 40 and len(set(dataset.groups)) == 40


def test_items_follow_the_torchxrayvision_convention(dataset):
    item = dataset[3]
    assert item["idx"] == 3 and item["img"].shape == (1, 32, 32) and item["img"].dtype == torch.float32
    assert 0.0 <= item["img"].min() and item["img"].max() <= 1.0
    assert item["lab"].shape == (14,)
    report = dataset.reports[3]
    assert np.array_equal(item["lab"].numpy(), label_vector(report.major))
    assert report.text() == dataset.texts[3]


def test_it_is_an_xray_dataset_with_the_pixel_conversion_of_the_real_ones(dataset):
    """One dataset class: one record per report (its uid), view PA, skipped reports counted with
    examples as the real datasets count theirs, and img = to_unit_float of the uint8 phantom."""
    assert isinstance(dataset, XRayDataset) and dataset.name == "openi_phantom" and dataset.image_size == 32
    assert list(dataset.csv["record"]) == dataset.groups == [r.uid for r in dataset.reports]
    assert set(dataset.views) == {"PA"} and dataset.selection == {} and not hasattr(dataset, "official_split")
    assert dataset.skipped_examples == {"no FINDINGS or IMPRESSION text": ["CXR16", "CXR566", "CXR614"]}
    for i in range(len(dataset)):
        assert torch.equal(dataset[i]["img"], torch.from_numpy(to_unit_float(dataset.images[i]))[None])
    grey = np.arange(256, dtype=np.uint8)  # bit for bit the conversion the phantom had of its own
    assert torch.equal(torch.from_numpy(to_unit_float(grey)), torch.from_numpy(grey).float().div_(255.0))


def test_text_is_findings_and_impression_with_optional_indication():
    report = next(r for r in read_reports() if r.uid == "CXR1")
    assert report.text().startswith("The cardiac silhouette") and report.text().endswith("Normal chest x-XXXX.")
    assert report.text(include_indication=True).startswith("Positive TB test The cardiac")


def test_images_are_cached_and_deterministic(dataset, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    first = op.OpenIPhantomDataset(image_size=32, max_reports=40, cache_dir=cache)
    assert np.array_equal(first.images, dataset.images)  # same reports, same pixels
    monkeypatch.setattr(op, "render_reports", lambda *a, **k: pytest.fail("rendered again despite the cache"))
    again = op.OpenIPhantomDataset(image_size=32, max_reports=40, cache_dir=cache)
    assert np.array_equal(again.images, first.images)


def test_the_image_cache_is_written_atomically(tmp_path, monkeypatch):
    """Through vkd_pyro.files.atomic_path: fsynced, renamed into place, nothing left by a failed write."""
    synced = []
    real_fsync = vkd_files._fsync_file
    monkeypatch.setattr(vkd_files, "_fsync_file", lambda path: synced.append(path.name) or real_fsync(path))
    ds = op.OpenIPhantomDataset(image_size=16, max_reports=5, cache_dir=tmp_path)
    cached = list((tmp_path / "phantom").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npy" and np.array_equal(np.load(cached[0]), ds.images)
    assert len(synced) == 1 and synced[0].startswith(f".{cached[0].name}.")

    def fail(path, *args, **kwargs):
        open(path, "wb").write(b"half an array")
        raise OSError("disk full")

    monkeypatch.setattr(op.np, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        op.OpenIPhantomDataset(image_size=16, max_reports=6, cache_dir=tmp_path)
    assert list((tmp_path / "phantom").iterdir()) == cached


def test_signal_changes_the_images_of_reports_with_findings(tmp_path):
    strong = op.OpenIPhantomDataset(image_size=32, max_reports=20, signal=1.0, cache_dir=tmp_path)
    none = op.OpenIPhantomDataset(image_size=32, max_reports=20, signal=0.0, cache_dir=tmp_path)
    abnormal = [i for i, r in enumerate(strong.reports) if strong.labels[i, 1:].sum() > 0]
    assert abnormal and any(not np.array_equal(strong.images[i], none.images[i]) for i in abnormal)


def test_label_policy_ignore_masks_the_uncertain_labels(tmp_path):
    from vkd_pyro.data.labels import report_labels

    zeros = op.OpenIPhantomDataset(image_size=16, max_reports=200, cache_dir=tmp_path)
    ignore = op.OpenIPhantomDataset(image_size=16, max_reports=200, cache_dir=tmp_path, label_policy="ignore")
    ones = op.OpenIPhantomDataset(image_size=16, max_reports=200, cache_dir=tmp_path, label_policy="ones")
    assert zeros.label_mask is None and ones.label_mask is None and "lab_mask" not in zeros[0]
    assert np.array_equal(ignore.labels, zeros.labels) and np.array_equal(ignore.images, zeros.images)
    unknown = ignore.label_mask == 0
    assert unknown.any() and np.array_equal(unknown, ones.labels != zeros.labels)
    i = int(np.flatnonzero(unknown.any(axis=1))[0])
    assert np.array_equal(ignore[i]["lab_mask"].numpy(), ignore.label_mask[i])
    r = ignore.reports[i]
    assert np.array_equal(ignore.label_mask[i], report_labels(r.major, r.text(), "ignore")[1])
