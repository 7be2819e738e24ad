"""The phantom radiograph renderer, `vkd_pyro.data.phantom`: determinism, the `signal` knob, where
findings land (radiological orientation), their degree, and that no class is a silent no-op."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vkd_pyro.classes import CLASSES
from vkd_pyro.data.openi_reports import MeshTerm
from vkd_pyro.data.phantom import RENDERER_VERSION, contact_sheet, render_phantom

REPO = Path(__file__).resolve().parents[1]
SEEDS = ("CXR1", "CXR2", "CXR3", "CXR4")


def T(text: str) -> MeshTerm:
    return MeshTerm.parse(text)


# One typical term per pathology class (every class but No Finding).
TYPICAL = {
    "Enlarged Cardiomediastinum": T("Mediastinum/enlarged"),
    "Cardiomegaly": T("Cardiomegaly/moderate"),
    "Lung Opacity": T("Opacity/lung/base/left"),
    "Lung Lesion": T("Calcified Granuloma/lung/upper lobe/right"),
    "Edema": T("Pulmonary Edema"),
    "Consolidation": T("Consolidation/lung/lower lobe/right"),
    "Pneumonia": T("Pneumonia/left"),
    "Atelectasis": T("Pulmonary Atelectasis/base/right"),
    "Pneumothorax": T("Pneumothorax/right"),
    "Pleural Effusion": T("Pleural Effusion/left"),
    "Pleural Other": T("Thickening/pleura/right"),
    "Fracture": T("Fractures, Bone/ribs/left"),
    "Support Devices": T("Catheters, Indwelling/right"),
}
ALL_FINDINGS = list(TYPICAL.items())


def diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def changed(seed: str, findings, size: int = 64, signal: float = 1.0, level: int = 6) -> np.ndarray:
    """Boolean map of the pixels the findings move by more than `level` grey levels."""
    return diff(render_phantom(seed, findings, size, signal), render_phantom(seed, [], size)) > level


def test_version_is_a_nonempty_string():
    assert isinstance(RENDERER_VERSION, str) and RENDERER_VERSION


@pytest.mark.parametrize("size", [32, 64, 128])
def test_dtype_and_shape(size):
    img = render_phantom("CXR7", ALL_FINDINGS, size=size)
    assert img.dtype == np.uint8 and img.shape == (size, size)
    # a radiograph: dark air outside the body and in the lungs, bright bone/heart/abdomen
    assert img.min() < 60 and img.max() > 200 and 40 < img.mean() < 220


def test_same_key_same_image_and_different_key_different_anatomy():
    a = render_phantom("CXR10", ALL_FINDINGS, 64)
    assert np.array_equal(a, render_phantom("CXR10", ALL_FINDINGS, 64))
    for other in ("CXR11", "CXR100", "cxr10"):
        assert diff(a, render_phantom(other, ALL_FINDINGS, 64)).mean() > 4
    # the anatomy alone differs too (not only the noise)
    n1, n2 = render_phantom("CXR10", [], 64).astype(float), render_phantom("CXR11", [], 64).astype(float)
    blur = lambda im: im.reshape(16, 4, 16, 4).mean(axis=(1, 3))  # noqa: E731
    assert np.abs(blur(n1) - blur(n2)).mean() > 3


def test_seed_is_stable_across_processes_and_hash_seeds():
    """The key is hashed with hashlib, not Python's salted hash(): another interpreter with another
    PYTHONHASHSEED renders the very same pixels."""
    code = ("import hashlib; from vkd_pyro.data.phantom import render_phantom as r; "
            "from vkd_pyro.data.openi_reports import MeshTerm as M; "
            "print(hashlib.sha256(r('CXR42', [('Lung Opacity', M.parse('Opacity/lung/base/left'))], 48)"
            ".tobytes()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    here = hashlib.sha256(render_phantom("CXR42", [("Lung Opacity", T("Opacity/lung/base/left"))], 48)
                          .tobytes()).hexdigest()
    assert out == here


def test_signal_zero_is_exactly_no_findings_and_more_signal_moves_further():
    for seed in SEEDS[:2]:
        plain = render_phantom(seed, [], 64)
        assert np.array_equal(render_phantom(seed, ALL_FINDINGS, 64, signal=0.0), plain)
        dists = [diff(render_phantom(seed, ALL_FINDINGS, 64, signal=s), plain).sum() for s in (0.25, 0.5, 1.0, 2.0)]
        assert dists[0] > 0
        assert all(a < b for a, b in zip(dists, dists[1:])), dists
    with pytest.raises(ValueError):
        render_phantom("CXR1", [], 64, signal=-1.0)


@pytest.mark.parametrize("cls", [c for c in CLASSES if c != "No Finding"])
def test_every_pathology_class_changes_the_image(cls):
    for seed in SEEDS:
        assert changed(seed, [(cls, TYPICAL[cls])]).sum() >= 3, (cls, seed)


def test_no_finding_and_unknown_classes_draw_nothing():
    plain = render_phantom("CXR5", [], 64)
    assert np.array_equal(render_phantom("CXR5", [("No Finding", T("normal"))], 64), plain)
    assert np.array_equal(render_phantom("CXR5", [("Hernia", T("Hernia, Hiatal")), ("", T("Scoliosis"))], 64), plain)


def test_findings_do_not_change_the_anatomy_elsewhere():
    """Adding a finding only changes pixels near it: the anatomy and noise streams stay put."""
    moved = changed("CXR6", [("Lung Lesion", T("Nodule/lung/upper lobe/right"))], level=0)
    assert 0 < moved.sum() < 0.05 * moved.size


@pytest.mark.parametrize("cls,term", [
    ("Pleural Effusion", "Pleural Effusion/{side}"),
    ("Lung Opacity", "Opacity/lung/{side}"),
    ("Pneumothorax", "Pneumothorax/{side}/moderate"),
    ("Atelectasis", "Pulmonary Atelectasis/base/{side}"),
])
def test_laterality_is_radiological(cls, term):
    """The patient's right is the image's LEFT half, the patient's left the image's RIGHT half."""
    for seed in SEEDS:
        right = changed(seed, [(cls, T(term.format(side="right")))], size=64)
        left = changed(seed, [(cls, T(term.format(side="left")))], size=64)
        assert right[:, :32].sum() > 4 * right[:, 32:].sum() and right.sum() > 0, (seed, "right")
        assert left[:, 32:].sum() > 4 * left[:, :32].sum() and left.sum() > 0, (seed, "left")


@pytest.mark.parametrize("cls,head", [("Lung Opacity", "Opacity/lung"), ("Pleural Other", "Thickening/pleura"),
                                      ("Atelectasis", "Pulmonary Atelectasis")])
def test_base_is_low_and_apex_is_high(cls, head):
    rows = np.arange(64)[:, None]
    for seed in SEEDS:
        base = changed(seed, [(cls, T(f"{head}/base/right"))])
        apex = changed(seed, [(cls, T(f"{head}/apex/right"))])
        assert base.sum() > 0 and apex.sum() > 0
        mean_row = lambda m: (m * rows).sum() / m.sum()  # noqa: E731
        assert mean_row(base) > mean_row(apex) + 10, seed


def test_upper_lobe_middle_lobe_and_retrocardiac_places():
    rows, cols = np.arange(64)[:, None], np.arange(64)[None, :]
    for seed in SEEDS:
        upper = changed(seed, [("Consolidation", T("Consolidation/lung/upper lobe/right"))])
        middle = changed(seed, [("Lung Opacity", T("Opacity/lung/middle lobe"))])      # right only
        retro = changed(seed, [("Lung Opacity", T("Opacity/lung/retrocardiac"))])      # left, medial
        row = lambda m: (m * rows).sum() / m.sum()  # noqa: E731
        col = lambda m: (m * cols).sum() / m.sum()  # noqa: E731
        assert row(upper) < row(middle) < row(retro)
        assert col(middle) < 32 < col(retro) < 48


@pytest.mark.parametrize("cls,head", [("Pleural Effusion", "Pleural Effusion/left"),
                                      ("Pneumothorax", "Pneumothorax/left"),
                                      ("Lung Opacity", "Opacity/lung/base/right"),
                                      ("Cardiomegaly", "Cardiomegaly"),
                                      ("Lung Lesion", "Nodule/lung/upper lobe/left")])
def test_large_changes_more_than_small(cls, head):
    for seed in SEEDS:
        small = changed(seed, [(cls, T(f"{head}/small"))]).sum()
        large = changed(seed, [(cls, T(f"{head}/large"))]).sum()
        assert large > 1.2 * small > 0, (seed, small, large)


def test_degree_order_for_effusion():
    counts = [sum(changed(s, [("Pleural Effusion", T(f"Pleural Effusion/right/{d}"))]).sum() for s in SEEDS)
              for d in ("borderline", "mild", "small", "moderate", "large", "severe")]
    assert counts == sorted(counts) and counts[0] < counts[-1], counts


def _heart_width(img: np.ndarray, y: float) -> int:
    """Width in pixels of the bright run through the image centre at height y (-1 top .. 1 bottom):
    threshold halfway between the darkest (lung) and the centre (mediastinum) brightness."""
    size = img.shape[0]
    r = int((y + 1) / 2 * size)
    row = img[r - 2:r + 3].astype(float).mean(axis=0)
    c = size // 2
    inner = row[size // 8: size - size // 8]
    thr = 0.5 * (inner.min() + row[c - 2:c + 3].mean())
    lo = c
    while lo > 0 and row[lo - 1] > thr:
        lo -= 1
    hi = c
    while hi < size - 1 and row[hi + 1] > thr:
        hi += 1
    return hi - lo + 1


def test_cardiomegaly_widens_the_cardiac_silhouette():
    for seed in SEEDS:
        plain = render_phantom(seed, [], 128)
        big = render_phantom(seed, [("Cardiomegaly", T("Cardiomegaly/moderate"))], 128)
        w0 = np.mean([_heart_width(plain, y) for y in (0.15, 0.22, 0.3)])
        w1 = np.mean([_heart_width(big, y) for y in (0.15, 0.22, 0.3)])
        assert w1 > w0 + 8, (seed, w0, w1)          # 8 px of 128: a clearly larger heart
        # the heart grows mostly to the patient's left (image right)
        grew = diff(big, plain) > 10
        assert grew[:, 64:].sum() > grew[:, :64].sum()


def test_enlarged_cardiomediastinum_widens_the_upper_mediastinum():
    for seed in SEEDS:
        plain = render_phantom(seed, [], 128)
        wide = render_phantom(seed, [("Enlarged Cardiomediastinum", T("Mediastinum/enlarged/large"))], 128)
        w0 = np.mean([_heart_width(plain, y) for y in (-0.45, -0.35, -0.25)])
        w1 = np.mean([_heart_width(wide, y) for y in (-0.45, -0.35, -0.25)])
        assert w1 > w0 + 6, (seed, w0, w1)


def test_calcified_lesion_is_brighter_and_sharper_than_a_nodule():
    def peak_and_edge(seed, term):
        d = diff(render_phantom(seed, [("Lung Lesion", T(term))], 128), render_phantom(seed, [], 128)).astype(float)
        return d.max(), np.abs(np.diff(d, axis=1)).max()      # brightness, steepest edge

    for seed in SEEDS:
        nodule = peak_and_edge(seed, "Nodule/lung/upper lobe/right")
        for calcified in ("Calcified Granuloma/lung/upper lobe/right", "Granuloma/lung/upper lobe/right",
                          "Nodule/lung/upper lobe/right/calcified"):
            peak, edge = peak_and_edge(seed, calcified)
            assert peak > 1.1 * nodule[0] and edge > 1.5 * nodule[1], (seed, calcified)


def test_support_device_kinds_all_draw():
    for head in ("Catheters, Indwelling", "Implanted Medical Device", "Surgical Instruments", "Tube, Inserted",
                 "Stents", "Medical Device", "Catheters, Indwelling/abdomen"):
        assert changed("CXR8", [("Support Devices", T(head))]).sum() >= 6, head


def test_contact_sheet_writes_a_png(tmp_path):
    images = [render_phantom(f"CXR{i}", ALL_FINDINGS[i: i + 2], 32) for i in range(5)]
    titles = [", ".join(c for c, _ in ALL_FINDINGS[i: i + 2]) for i in range(5)]
    path = tmp_path / "sheet.png"
    contact_sheet(images, titles, path, columns=3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


# -- difficulty ---------------------------------------------------------------------------------

def _contrast(cls, term, d, keys):
    """Mean absolute pixel change a finding makes, over patients, at difficulty d."""
    return np.mean([np.abs(render_phantom(k, [(cls, MeshTerm.parse(term))], 64, difficulty=d).astype(float)
                           - render_phantom(k, [], 64, difficulty=d).astype(float)).mean() for k in keys])


def test_difficulty_zero_is_the_default_and_difficulty_is_deterministic():
    findings = [("Lung Opacity", MeshTerm.parse("Opacity/lung/base/left"))]
    assert np.array_equal(render_phantom("CXR5", findings, 64), render_phantom("CXR5", findings, 64, difficulty=0.0))
    hard = render_phantom("CXR5", findings, 64, difficulty=0.7)
    assert np.array_equal(hard, render_phantom("CXR5", findings, 64, difficulty=0.7))
    assert not np.array_equal(hard, render_phantom("CXR5", findings, 64))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="difficulty"):
            render_phantom("CXR5", findings, 64, difficulty=bad)


def test_difficulty_adds_noise_and_blur_and_fades_findings():
    keys = [f"CXR{i}" for i in range(12)]
    # pixel-to-pixel differences of normal films: blur lowers them, quantum noise and anatomical
    # noise raise them; the net effect at difficulty 1 is an increase
    easy = np.stack([render_phantom(k, [], 96).astype(float) for k in keys])
    hard = np.stack([render_phantom(k, [], 96, difficulty=1.0).astype(float) for k in keys])
    assert np.std(np.diff(hard, axis=2)) > 1.1 * np.std(np.diff(easy, axis=2))  # measured 20.7 vs 17.8
    # the finding's effect on the pixels shrinks on average (conspicuity spread)
    assert _contrast("Pleural Effusion", "Pleural Effusion/left/large", 1.0, keys) < \
        0.95 * _contrast("Pleural Effusion", "Pleural Effusion/left/large", 0.0, keys)


def test_difficulty_keeps_findings_detectable():
    """At difficulty 1 a finding still changes the film: on average at least a quarter as much as
    at difficulty 0 (its contrast factor is Uniform(0.2, 1), blur spreads but keeps its mass)."""
    keys = [f"CXR{i}" for i in range(8)]
    for cls, term in (("Cardiomegaly", "Cardiomegaly/moderate"), ("Pleural Effusion", "Pleural Effusion/left/large"),
                      ("Lung Lesion", "Nodule/lung/upper lobe/right")):
        assert _contrast(cls, term, 1.0, keys) > 0.25 * _contrast(cls, term, 0.0, keys) > 0
