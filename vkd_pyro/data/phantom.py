"""Synthetic frontal (PA) chest radiograph "phantoms" drawn from a report's findings.

No chest X-ray pixels exist on the machines of this project, so every OpenI report gets one
rendered radiograph whose visible findings are the ones its MeSH major terms name: an image-only
classifier can then learn what the report says from pixels alone.

Conventions
-----------
* Orientation is radiological, as on a PA film viewed by a radiologist: the patient's RIGHT is
  on the image's LEFT (small column index), the patient's LEFT on the image's RIGHT; the top row is
  cranial.  The heart therefore bulges to the image right, the gastric bubble sits under the image
  right hemidiaphragm and the (patient-)right hemidiaphragm, image left, is the higher one.
* Brightness is density: bone, metal, heart, fluid and soft tissue are bright; air and lung are
  dark.  Drawing happens in a density map ``D`` (about 0.55 for soft tissue, 0.1 to 0.2 for aerated
  lung) which is turned into intensity by ``1 - exp(-k D)``, a per-image gamma, contrast,
  heel-effect gradient and noise, then quantised to uint8.
* Units are normalised, independent of ``size``: pixel centres span [-1, 1] on both axes (x to
  the image right, y downwards).  Anatomy is laid out in *patient* coordinates (x, y) obtained
  from the image grid by a small per-patient rotation, shift and body-size scaling, so everything
  scales with ``size`` and nothing is rendered at a fixed resolution and resampled.  Inside a
  hemithorax, a finding is placed in lung-relative coordinates ``u`` (-1 medial .. +1 lateral)
  and ``v`` (0 apex .. 1 costophrenic angle).
* Randomness: every random draw comes from ``numpy.random.Generator`` (PCG64) streams seeded
  from a blake2b hash of ``seed_key`` (never Python's salted ``hash``): one stream for the anatomy
  and exposure, one for the noise and one per finding (keyed by class, term and occurrence), so a
  report gives the same image in every process and on every machine, and adding a finding never
  changes the anatomy.  (The draws are bit-identical everywhere; a float32 ``exp``/``cos`` that
  rounds differently on another CPU could at most move a rare pixel by one grey level.)
  ``RENDERER_VERSION`` changes whenever the drawing does: it keys the on-disk image cache.
* ``signal`` scales every finding: each finding's density contrast (and each geometric change,
  such as the enlargement of the heart in cardiomegaly or the widening of the mediastinum) is
  multiplied by ``signal``.  ``signal = 0`` yields exactly the image without findings;
  ``signal = 1`` is the nominal look; larger values exaggerate.
* ``difficulty`` in [0, 1] (default 0: exactly the images of ``difficulty``-less versions) makes
  the film harder to read the way real films are hard, in four ways that all grow linearly with it
  (docs/phantom_difficulty.md shows contact sheets):

  - conspicuity: each finding's contrast and geometric change is multiplied by its own factor
    ``c ~ Uniform(1 - 0.8 d, 1)`` (a stream of its own per finding): some findings are subtle,
    as small, faint or overlapped ones are on real films;
  - anatomical noise: a smooth random density field of RMS ``0.06 d`` (features ~0.1 to 0.2 of the
    image) is added inside the body: overlying soft tissue, breast and bowel gas that real findings
    hide in (the dominant limit of conspicuity on chest films);
  - unsharpness: the intensity image is blurred by a Gaussian of sigma ``0.02 d`` image half-widths
    (about 0.6 px at 64 px, 1.3 px at 128 px for d = 1): focal spot, detector and motion blur;
  - quantum noise: the white noise's standard deviation is multiplied by ``1 + 2 d`` (a dose about
    9 times lower at d = 1).

Findings are ``(class_name, MeshTerm)`` pairs (the 14 CheXpert classes of ``vkd_pyro.classes``);
the term's qualifiers choose the side ('right', 'left', 'bilateral'), the place ('apex', 'upper
lobe', 'middle lobe', 'lingula', 'hilum', 'retrocardiac', 'lower lobe', 'base') and the degree
('borderline' < 'mild' < 'small' < 'moderate' < 'large' < 'severe'), with a per-class default when
the term gives none.  Unknown class names, and 'No Finding', draw nothing.  Appearance by class:

================================  ==============================================================
Cardiomegaly                      wider cardiac silhouette, mostly to the image right
Enlarged Cardiomediastinum        wider upper mediastinum and aortic knob
Lung Opacity                      patchy cluster of small soft blobs, mottled
Pneumonia                         confluent cloud, lower zones by default, denser
Consolidation                     homogeneous lobar density bounded by a fissure, air bronchograms
Edema                             perihilar bat-wing haze, prominent upper-zone vessels, Kerley B
Atelectasis                       thin plate-like band
Pleural Effusion                  dense fluid in the costophrenic angle under a meniscus
Pneumothorax                      lucent rim without lung markings, thin visible pleural line
Lung Lesion                       nodule / mass; calcified granuloma small, bright and sharp
Fracture                          rib with a lucent gap and a stepped fragment (clavicle, spine)
Pleural Other                     lumpy band along the inside of the chest wall (apical cap)
Support Devices                   central line, NG/ET tube, pacemaker and leads, sternotomy wires,
                                  ECG electrodes, stent, spinal rods (by the term's head)
================================  ==============================================================
"""

from __future__ import annotations

import hashlib
import math
import textwrap
from functools import lru_cache
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.ndimage import gaussian_filter

from vkd_pyro.data.openi_reports import MeshTerm

RENDERER_VERSION = "phantom-1"

#: Size factor of a finding by the degree its term states (the largest one wins).
DEGREE = {"borderline": 0.55, "mild": 0.7, "small": 0.8, "moderate": 1.0, "large": 1.35, "severe": 1.6}
#: Size factor of a finding whose term states no degree.
DEFAULT_DEGREE = 0.9

# Places a term can name, as ranges of lung-relative (u, v); u: -1 medial .. 1 lateral,
# v: 0 apex .. 1 costophrenic angle.  The third item forces a side (patient right -1, left +1).
_ZONES = {
    "apex": ((-0.3, 0.4), (0.10, 0.22), None),
    "upper lobe": ((-0.4, 0.5), (0.16, 0.36), None),
    "hilum": ((-0.85, -0.55), (0.36, 0.48), None),
    "middle lobe": ((-0.6, 0.2), (0.52, 0.70), -1),
    "lingula": ((-0.55, 0.15), (0.52, 0.72), +1),
    "retrocardiac": ((-0.95, -0.65), (0.70, 0.86), +1),
    "lower lobe": ((-0.3, 0.55), (0.64, 0.84), None),
    "base": ((-0.2, 0.65), (0.72, 0.90), None),
    "mid": ((-0.4, 0.5), (0.40, 0.62), None),
}
_ZONE_ORDER = ("retrocardiac", "lingula", "middle lobe", "hilum", "apex", "upper lobe", "lower lobe", "base")

_ABBREV = {
    "No Finding": "Normal",
    "Enlarged Cardiomediastinum": "EnlCardiomed",
    "Cardiomegaly": "Cardiomeg",
    "Lung Opacity": "Opacity",
    "Lung Lesion": "Lesion",
    "Edema": "Edema",
    "Consolidation": "Consolid",
    "Pneumonia": "Pneumonia",
    "Atelectasis": "Atelect",
    "Pneumothorax": "PTX",
    "Pleural Effusion": "Effusion",
    "Pleural Other": "PleuralOth",
    "Fracture": "Fracture",
    "Support Devices": "Devices",
}

_F32 = np.float32


# ----------------------------------------------------------------------------------------------
# seeding and small helpers

def _seed(*parts: object) -> int:
    """A stable 64-bit seed from the parts (blake2b of their text, never Python's hash)."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng(_seed(*parts))


@lru_cache(maxsize=32)
def _axis(size: int) -> np.ndarray:
    """Pixel-centre coordinates in [-1, 1] along one axis."""
    a = ((np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0).astype(_F32)
    a.flags.writeable = False
    return a


@lru_cache(maxsize=64)
def _interp_matrix(size: int, n: int) -> np.ndarray:
    """(size, n) Gaussian interpolation weights: A @ G @ A.T turns an n x n white-noise grid into
    a smooth unit-variance field of `size` x `size` pixels."""
    centres = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    pos = _axis(size).astype(np.float64)
    w = np.exp(-0.5 * ((pos[:, None] - centres[None, :]) / (1.6 / n)) ** 2)
    w /= np.sqrt((w ** 2).sum(axis=1, keepdims=True))
    w = w.astype(_F32)
    w.flags.writeable = False
    return w


def _smooth_noise(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    a = _interp_matrix(size, n)
    return a @ rng.standard_normal((n, n), dtype=_F32) @ a.T


def _ramp(d, inv_w: float):
    """Soft step: 0 where d << 0, 1 where d >> 0, linear over a width of 1 / inv_w."""
    return np.clip(d * inv_w + 0.5, 0.0, 1.0)


def _catmull_rom(points: Sequence[tuple[float, float]], per_segment: int = 4) -> np.ndarray:
    """A smooth curve through `points` as a dense polyline (k, 2)."""
    p = np.asarray(points, dtype=np.float64)
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None]
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3))
    out.append(p[-2][None, :])
    return np.vstack(out)


def _degree(term: MeshTerm) -> float:
    found = [DEGREE[q] for q in term.qualifiers if q in DEGREE]
    return max(found) if found else DEFAULT_DEGREE


def _coerce_term(term) -> MeshTerm:
    if isinstance(term, MeshTerm):
        return term
    if term is None:
        return MeshTerm("")
    return MeshTerm.parse(str(term))


# ----------------------------------------------------------------------------------------------
# the patient

def _anatomy_params(rng: np.random.Generator) -> dict:
    """Per-patient anatomy and exposure, all in normalised patient units."""
    u = rng.uniform
    breath = u(-1.0, 1.0)                      # +1 deep inspiration, -1 poor inspiration
    body = u(0.84, 1.0)
    p = {
        "rot": rng.normal(0.0, 0.035), "tx": rng.normal(0.0, 0.035), "ty": rng.normal(0.02, 0.03),
        "sx": body, "sy": body * u(0.93, 1.05),
        "med": u(0.085, 0.11),                  # medial lung edge
        "lat": u(0.76, 0.84) * (1.0 + 0.02 * breath),
        "apex": u(-0.78, -0.70),
        "apex_k": u(0.22, 0.32),
        "kd": u(0.14, 0.2) + 0.03 * breath,
    }
    dome_l = 0.36 + 0.07 * breath + rng.normal(0.0, 0.02)
    p["dome"] = {+1: dome_l, -1: dome_l - u(0.02, 0.07)}
    p["med_w"] = p["med"] + u(0.005, 0.02)    # mediastinum half-width (hides the medial lung edge)
    p["med_x"] = rng.normal(0.0, 0.01)
    p["knob_r"] = u(0.055, 0.075)
    p["heart_cx"] = u(0.0, 0.05)
    p["heart_cy"] = dome_l + u(-0.06, -0.02)
    p["heart_rx"] = u(0.42, 0.48) * (1.0 - 0.04 * breath)     # left ventricular border
    p["heart_rxr"] = u(0.22, 0.27)                           # right atrial border
    p["heart_ry"] = u(0.3, 0.35)
    p["carina"] = p["apex"] + u(0.42, 0.5)
    p["hila"] = {-1: (p["med"] + u(0.07, 0.1), u(-0.06, 0.0)), +1: (p["med"] + u(0.07, 0.1), u(-0.12, -0.06))}
    low = [(u(8.0, 18.0), u(-4.0, 4.0), u(0, 2 * math.pi), u(0.6, 1.0)) for _ in range(5)]
    high = [(u(22.0, 36.0), u(-3.0, 3.0), u(0, 2 * math.pi), u(0.4, 0.7)) for _ in range(3)]
    p["vessel_modes"] = (low, high)
    p["vessel_mrms"] = math.sqrt(sum(a * a * m * m for m, _, _, a in low) / sum(a * a for _, _, _, a in low))
    p["vessel_amp"] = u(0.12, 0.16)
    p["ribs"] = (u(-0.4, -0.3), u(0.6, 0.8), u(9.3, 10.2), u(0.06, 0.085))
    p["ant_ph"] = u(0.0, 0.2)
    p["vert_ph"] = u(0.0, 0.12)
    p["clav"] = (u(0.1, 0.16), u(0.08, 0.14), u(0.026, 0.034))
    p["neck"] = u(0.3, 0.38)
    p["torso"] = u(0.95, 1.02)
    p["bubble"] = u(0.0, 1.0) < 0.65
    p["bubble_r"] = (u(0.06, 0.1), u(0.04, 0.06))
    p["exposure"] = (u(2.0, 2.8), u(0.8, 1.2), u(0.0, 0.06), u(0.9, 1.0), u(-0.04, 0.04), u(0.008, 0.025))
    return p


def _lat_profile(v):
    """Lateral lung edge (fraction of the widest) from apex (v = 0) to costophrenic angle (v = 1)."""
    return 0.62 + 0.38 * np.sqrt(v) if isinstance(v, np.ndarray) else 0.62 + 0.38 * math.sqrt(v)


class _Canvas:
    """The grids, the geometry and the density map of one image while it is being drawn."""

    def __init__(self, size: int, p: dict):
        self.size = size
        self.p = p
        ax = _axis(size)
        self.ax = ax
        c, s = math.cos(p["rot"]), math.sin(p["rot"])
        sx, sy = p["sx"], p["sy"]
        # patient coordinates of every pixel
        self.x = ((c / sx) * (ax - p["tx"]))[None, :] + ((s / sx) * (ax - p["ty"]))[:, None]
        self.y = ((-s / sy) * (ax - p["tx"]))[None, :] + ((c / sy) * (ax - p["ty"]))[:, None]
        self.px = 2.0 / size / sx                     # one pixel in patient units
        self.inv_e = 1.0 / (1.2 * self.px)            # edge sharpness of anatomy
        self.D = None
        self.lungs = {}

    # -- coordinates
    def to_image(self, x: float, y: float) -> tuple[float, float]:
        p = self.p
        c, s = math.cos(p["rot"]), math.sin(p["rot"])
        dx, dy = x * p["sx"], y * p["sy"]
        return p["tx"] + c * dx - s * dy, p["ty"] + s * dx + c * dy

    def lung_point(self, side: int, u: float, v: float, clamp: bool = True) -> tuple[float, float]:
        """Patient (x, y) of lung-relative (u, v) in hemithorax `side`; `clamp` keeps the point
        inside the lung (above the hemidiaphragm, off the walls)."""
        p = self.p
        apex, dome, kd = p["apex"], p["dome"][side], p["kd"]
        cp = dome + kd
        if clamp:
            u = min(max(u, -0.95), 0.85)
            v = max(v, 0.06)
        for _ in range(2 if clamp else 1):
            lat = p["lat"] * _lat_profile(min(max(v, 0.0), 1.0))
            c, hw = 0.5 * (lat + p["med"]), 0.5 * (lat - p["med"])
            ax = c + u * hw
            if clamp:
                xd, wd = 0.5 * (p["lat"] + p["med"]), 0.5 * (p["lat"] - p["med"])
                v_dia = (dome + kd * ((ax - xd) / wd) ** 2 - apex) / (cp - apex)
                v = min(v, v_dia - 0.05)
        return side * ax, apex + v * (cp - apex)

    def texture(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return _smooth_noise(rng, self.size, n)

    # -- primitives (all return full-size float32 arrays)
    def blob(self, x: float, y: float, sx: float, sy: float | None = None) -> np.ndarray:
        """Separable Gaussian centred at patient (x, y) with patient-unit sigmas."""
        sy = sx if sy is None else sy
        cx, cy = self.to_image(x, y)
        a = self.ax
        gx = np.exp(-0.5 * ((a - cx) / (sx * self.p["sx"])) ** 2)
        gy = np.exp(-0.5 * ((a - cy) / (sy * self.p["sy"])) ** 2)
        return np.multiply.outer(gy, gx)

    def disc(self, x: float, y: float, r: float, edge: float) -> np.ndarray:
        d = np.hypot(self.x - x, self.y - y)
        return _ramp(r - d, 1.0 / max(edge, 1e-6))

    def polyline_dist(self, pts: np.ndarray) -> np.ndarray:
        """Distance of every pixel to a polyline (k, 2) in patient units."""
        a, b = pts[:-1], pts[1:]
        d = b - a
        l2 = np.maximum((d ** 2).sum(axis=1), 1e-12)
        x = self.x[None]
        y = self.y[None]
        ax_, ay_ = a[:, 0, None, None].astype(_F32), a[:, 1, None, None].astype(_F32)
        dx_, dy_ = d[:, 0, None, None].astype(_F32), d[:, 1, None, None].astype(_F32)
        rx, ry = x - ax_, y - ay_
        t = np.clip((rx * dx_ + ry * dy_) / l2[:, None, None].astype(_F32), 0.0, 1.0)
        return np.hypot(rx - t * dx_, ry - t * dy_).min(axis=0)

    def line(self, pts: np.ndarray, width: float) -> np.ndarray:
        """Anti-aliased line of half-width `width` (at least ~0.6 px so it shows at 64 px)."""
        w = max(width, 0.6 * self.px)
        return _ramp(w - self.polyline_dist(pts), 1.0 / (1.2 * self.px))

    def segment_band(self, x0, y0, x1, y1, half: float) -> np.ndarray:
        return self.line(np.array([[x0, y0], [x1, y1]]), half)

    # -- the lungs
    def lung(self, side: int, shrink: tuple[float, float, float] | None = None):
        """(signed distance inside the lung, u, v) for hemithorax `side`; `shrink` = (x0, y0, f)
        evaluates the lung scaled by f about patient point (x0, y0) (a collapsed lung)."""
        p = self.p
        x, y = self.x, self.y
        if shrink is not None:
            x0, y0, f = shrink
            x = x0 + (x - x0) / f
            y = y0 + (y - y0) / f
        ax = x * side
        apex, dome, kd = p["apex"], p["dome"][side], p["kd"]
        cp = dome + kd
        v = (y - apex) * (1.0 / (cp - apex))
        lat = p["lat"] * _lat_profile(np.clip(v, 0.0, 1.0))
        c = 0.5 * (lat + p["med"])
        hw = 0.5 * (lat - p["med"])
        off = ax - c
        u = off / hw
        d = hw - np.abs(off)                                     # lateral wall / mediastinum
        d = np.minimum(d, y - (apex + p["apex_k"] * (u + 0.3) ** 2))    # rounded apex
        xd, wd = 0.5 * (p["lat"] + p["med"]), 0.5 * (p["lat"] - p["med"])
        d = np.minimum(d, dome + kd * ((ax - xd) * (1.0 / wd)) ** 2 - y)  # hemidiaphragm dome
        return d, u, v


def _draw_anatomy(cv: _Canvas) -> None:
    p = cv.p
    x, y = cv.x, cv.y
    inv_e = cv.inv_e
    ax = np.abs(x)

    # body outline (neck, shoulders, chest wall); soft tissue thins towards the sides
    sh_y = p["apex"] - 0.12
    wb = p["neck"] + (p["torso"] - p["neck"]) * _ramp(y - sh_y, 1.0 / 0.3)
    body = _ramp(wb - ax, inv_e / 3.0)
    D = body * (0.6 - 0.2 * x * x)

    # lungs
    air = np.zeros_like(x)
    for side in (-1, +1):
        d, u, v = cv.lung(side)
        m = _ramp(d, inv_e)
        cv.lungs[side] = {"d": d, "u": u, "v": v, "mask": m}
        air += m

    # heart, mediastinum with aortic knob, trachea
    # the heart: four quarter-ellipses about a centre at diaphragm level, a small right border
    # (image left), a broad left ventricular border (image right), its base hidden in the abdomen
    dx, dy = x - p["heart_cx"], y - p["heart_cy"]
    hu = dx * np.where(dx < 0, 1.0 / p["heart_rxr"], 1.0 / p["heart_rx"]).astype(_F32)
    hv = dy * np.where(dy < 0, 1.0 / p["heart_ry"], 1.0 / (1.6 * p["heart_ry"])).astype(_F32)
    heart = _ramp((1.0 - np.sqrt(hu * hu + hv * hv)) * (0.6 * p["heart_ry"]), inv_e)
    mx = x - p["med_x"]
    knob_y = p["apex"] + 0.38
    med_half = p["med_w"] * (1.0 + 0.15 * np.clip(y - knob_y, 0.0, 1.0))
    med = _ramp(med_half - np.abs(mx), inv_e) * _ramp(p["heart_cy"] - y, inv_e)
    knob = _ramp(p["knob_r"] - np.hypot(mx - p["med_w"] * 0.8, y - knob_y), inv_e)
    med = np.maximum(med, knob)
    solid = np.maximum(heart, med)
    cv.heart, cv.med = heart, med
    cv.air = air * (1.0 - solid)
    lower = np.clip(y * 1.2 + 0.2, 0.0, 1.0)              # breast / pectoral soft tissue over the bases
    D -= (0.42 - 0.07 * lower) * cv.air
    D += 0.05 * heart + 0.07 * med
    trachea = _ramp(0.032 - np.abs(mx), inv_e) * _ramp(p["carina"] - y, inv_e)
    D -= 0.1 * trachea

    # vessels radiating from each hilum: the zero lines of a random field that varies fast with
    # the angle about the hilum and slowly with log-distance, so they wander, branch towards the
    # periphery (more modes there), taper and fade
    left = x >= 0
    hx = np.where(left, p["hila"][+1][0], -p["hila"][-1][0]).astype(_F32)
    hy = np.where(left, p["hila"][+1][1], p["hila"][-1][1]).astype(_F32)
    vx, vy = x - hx, y - hy
    rr = np.sqrt(vx * vx + vy * vy)
    th = np.arctan2(vy, np.abs(vx))
    rho = np.log(rr + 0.05)
    low, high = p["vessel_modes"]
    f = sum(amp * np.cos(m * th + q * rho + ph) for m, q, ph, amp in low)
    branch = _ramp(rr - 0.3, 5.0)
    f = f + branch * sum(amp * np.cos(m * th + q * rho + ph) for m, q, ph, amp in high)
    m_rms = p["vessel_mrms"]
    width = (0.02 * np.clip(1.0 - 0.9 * rr, 0.3, 1.0) + 0.45 * cv.px) * m_rms * 0.7
    ves = np.clip(1.0 - np.abs(f) * (rr + 0.02) / width, 0.0, 1.0)
    ves *= np.exp(-rr * 1.8) * air * _ramp(rr - 0.05, 20.0)
    cv.vessels = ves
    hila = np.exp(-(rr * rr) * (1.0 / (2 * 0.055 ** 2)))
    D += p["vessel_amp"] * ves + 0.12 * hila * air

    # spine with vertebral bodies
    spine = _ramp(0.068 - np.abs(mx), inv_e) * (0.8 + 0.2 * np.cos((y - p["vert_ph"]) * (2 * math.pi / 0.12)))
    D += 0.17 * spine * body

    # posterior ribs: arcs from the spine up and out, then down along the lateral wall
    a_arch, b_arch, nrib, rib_w = p["ribs"]
    t = y - (a_arch * ax + b_arch * ax * ax)
    t0, t1 = p["apex"] - 0.1, p["dome"][1] + 0.12
    z = np.clip((t - t0) * (1.0 / (t1 - t0)), 0.0, 1.0)
    phase = nrib * z ** 0.8
    cv.rib_phase = phase
    lat_lim = p["lat"] * 1.03 + 0.05
    ribmask = (_ramp(ax - 0.06, inv_e) * _ramp(lat_lim - ax, inv_e / 2)
               * _ramp(t - t0, inv_e) * _ramp(t1 - t, inv_e))
    rib = _rib_profile(phase) * ribmask
    cv.ribmask = ribmask
    cv.rib = rib
    cv.rib_w = rib_w
    # anterior ribs: fainter, sloping down towards the midline
    t2 = y + 0.5 * ax
    ant = np.clip(np.cos((t2 - p["ant_ph"]) * (2 * math.pi / 0.19)) * 2.0 - 1.0, 0.0, 1.0)
    ant *= _ramp(ax - 0.22, 6.0) * _ramp(p["dome"][1] - y, 6.0) * _ramp(y - p["apex"], 6.0) * body
    D += rib_w * rib + 0.035 * ant

    # clavicles: oblique, the lateral end higher
    cth = p["clav"][2]
    cyv = _clavicle_y(p, ax)
    clav = _ramp(cth - np.abs(y - cyv), inv_e) * _ramp(ax - 0.1, inv_e) * _ramp(0.7 - ax, inv_e)
    D += 0.2 * clav
    cv.clav = clav

    # gastric bubble under the left hemidiaphragm (image right)
    if p["bubble"]:
        bx, by = 0.36, p["dome"][+1] + 0.12 + p["bubble_r"][1]
        gb = _ramp(1.0 - np.hypot((x - bx) / p["bubble_r"][0], (y - by) / p["bubble_r"][1]), 10.0)
        D -= 0.18 * gb * _ramp(y - p["dome"][+1] - 0.03, inv_e)
    cv.D = D


def _clavicle_y(p: dict, ax):
    """Height of the clavicle's axis at distance `ax` from the midline (array or float)."""
    cm, rise, _ = p["clav"]
    s = np.clip((ax - 0.08) * (1.0 / 0.6), 0.0, 1.0)
    return p["apex"] + cm - rise * s + 0.03 * np.sin(s * (2 * math.pi))


def _rib_profile(phase):
    return np.clip((np.cos(phase * (2 * math.pi)) - 0.1) * 1.8, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# findings

def _sides(term: MeshTerm, rng, default: str, forced: int | None = None) -> list[int]:
    q = set(term.qualifiers)
    right, left = "right" in q, "left" in q
    if "bilateral" in q or (right and left):
        return [-1, +1]
    if right:
        return [-1]
    if left:
        return [+1]
    if forced is not None:
        return [forced]
    if default == "both":
        return [-1, +1]
    if default == "right":
        return [-1]
    if default == "left":
        return [+1]
    r = rng.uniform()
    if default == "one":                                  # a random single side
        return [-1] if r < 0.5 else [+1]
    return [-1, +1] if r < 0.25 else ([-1] if r < 0.65 else [+1])


_ZONE_ALIASES = {"costophrenic angle": "base", "diaphragm": "base", "cardiophrenic angle": "base",
                 "sulcus": "apex", "paratracheal": "hilum", "lymph nodes": "hilum"}


def _zone(term: MeshTerm, default: str) -> str:
    q = set(term.qualifiers)
    for z in _ZONE_ORDER:
        if z in q:
            return z
    for alias, z in _ZONE_ALIASES.items():
        if alias in q:
            return z
    return default


def _places(term: MeshTerm, rng, default_zone: str, default_side: str):
    zone = _zone(term, default_zone)
    (u0, u1), (v0, v1), forced = _ZONES[zone]
    out = []
    for side in _sides(term, rng, default_side, forced):
        out.append((side, rng.uniform(u0, u1), rng.uniform(v0, v1)))
    return zone, out


def _f_opacity(cv: _Canvas, term, rng, sig, deg):
    """Patchy, ill-defined opacity: a loose cluster of small soft blobs with a mottled texture."""
    _, places = _places(term, rng, "mid", "random")
    acc = np.zeros_like(cv.x)
    for side, u, v in places:
        for _ in range(int(rng.integers(5, 9))):
            x, y = cv.lung_point(side, u + rng.normal(0, 0.35 * deg), v + rng.normal(0, 0.1 * deg))
            acc += rng.uniform(0.6, 1.0) * cv.blob(x, y, rng.uniform(0.04, 0.065) * deg)
    tex = np.clip(0.6 + 0.45 * cv.texture(rng, 16), 0.2, 1.3)
    lungs = cv.lungs[-1]["mask"] + cv.lungs[+1]["mask"]
    cv.D += (sig * 0.3) * np.minimum(acc, 1.2) * tex * lungs * (1.0 - 0.5 * cv.heart)


def _f_pneumonia(cv: _Canvas, term, rng, sig, deg):
    """Confluent airspace cloud, lower zones by default, denser than plain opacity, soft margins."""
    _, places = _places(term, rng, "lower lobe", "random")
    acc = np.zeros_like(cv.x)
    for side, u, v in places:
        for _ in range(8):
            x, y = cv.lung_point(side, u + rng.normal(0, 0.4 * deg), v + rng.normal(0, 0.1 * deg))
            acc += cv.blob(x, y, rng.uniform(0.05, 0.09) * deg, rng.uniform(0.04, 0.07) * deg)
    tex = np.clip(0.7 + 0.45 * cv.texture(rng, 14), 0.2, 1.2)
    dens = np.clip(acc * 1.3, 0.0, 1.0) * tex
    side_m = sum(cv.lungs[s]["mask"] for s in {s for s, _, _ in places})
    cv.D += (sig * 0.36) * dens * side_m * (1.0 - 0.4 * cv.heart)


def _air_bronchograms(cv: _Canvas, rng, side: int) -> np.ndarray:
    hx, hy = cv.p["hila"][side]
    vx, vy = cv.x - side * hx, cv.y - hy
    rr = np.sqrt(vx * vx + vy * vy)
    th = np.arctan2(vy, np.abs(vx))
    c = np.cos(rng.uniform(16, 22) * th + 0.5 * np.sin(7.0 * rr) + rng.uniform(0, 6.3))
    return np.clip((c - 0.75) * 4.0, 0.0, 1.0) * _ramp(rr - 0.12, 8.0) * np.exp(-rr * 1.5)


def _lobe_mask(cv: _Canvas, side: int, zone: str) -> np.ndarray:
    L = cv.lungs[side]
    u, v = L["u"], L["v"]
    e = cv.inv_e * 0.5
    if zone in ("apex", "upper lobe"):
        return _ramp(0.42 - 0.05 * u - v, e * 0.5)                    # sharp lower border (fissure)
    if zone in ("middle lobe", "lingula"):
        return _ramp(v - 0.42, e * 0.5) * _ramp(0.72 + 0.1 * u - v, e * 0.3) * _ramp(0.4 - u, e * 0.2)
    if zone == "hilum":
        return _ramp(0.1 - u, e * 0.2) * _ramp(v - 0.25, e * 0.2) * _ramp(0.65 - v, e * 0.2)
    if zone == "retrocardiac":
        return _ramp(-0.2 - u, e * 0.2) * _ramp(v - 0.55, e * 0.3)
    # lower lobe / base / mid: below an oblique fissure
    return _ramp(v - (0.52 - 0.12 * u), e * 0.5)


def _f_consolidation(cv: _Canvas, term, rng, sig, deg):
    """Lobar, homogeneous dense opacity bounded by a fissure, with dark air-bronchogram streaks."""
    zone, places = _places(term, rng, "lower lobe", "random")
    for side, u, v in places:
        lobe = _lobe_mask(cv, side, zone)
        x, y = cv.lung_point(side, u, v)
        env = np.clip(cv.blob(x, y, 0.2 * deg, 0.16 * deg) * 1.8, 0.0, 1.0)
        dens = lobe * env * cv.lungs[side]["mask"]
        ab = _air_bronchograms(cv, rng, side)
        cv.D += (sig * 0.42) * dens * (1.0 - 0.55 * ab) * (1.0 - 0.4 * cv.heart)


def _f_edema(cv: _Canvas, term, rng, sig, deg):
    """Bilateral perihilar (bat-wing) haze, prominent upper-zone vessels, Kerley B lines."""
    sides = _sides(term, rng, "both")
    for side in sides:
        L = cv.lungs[side]
        hx, hy = cv.p["hila"][side]
        haze = cv.blob(side * (hx + 0.12), hy + 0.05, 0.2 * deg, 0.2 * deg)
        cv.D += (sig * 0.3) * haze * L["mask"] * (1.0 - 0.5 * cv.heart)
        kerley = np.clip((np.cos(cv.y * (2 * math.pi / 0.045)) - 0.6) * 3.0, 0.0, 1.0)
        band = _ramp(0.09 - L["d"], 20.0) * _ramp(L["v"] - 0.6, 10.0) * _ramp(L["u"] - 0.3, 10.0)
        cv.D += (sig * 0.12 * deg) * kerley * band * L["mask"]
        # vascular prominence, most in the upper zones (cephalisation)
        upper = np.clip(1.2 - L["v"], 0.3, 1.0)
        cv.D += (sig * 0.12 * deg) * cv.vessels * upper * L["mask"] + (sig * 0.06) * cv.blob(side * hx, hy, 0.07)


def _f_atelectasis(cv: _Canvas, term, rng, sig, deg):
    """Plate-like (discoid) atelectasis: a thin, nearly horizontal dense band."""
    _, places = _places(term, rng, "base", "random")
    n = 2 if "multiple" in term.qualifiers else 1
    for side, u, v in places:
        for k in range(n):
            x, y = cv.lung_point(side, u - 0.1, v - 0.1 - 0.12 * k)
            half = rng.uniform(0.11, 0.16) * deg
            tilt = rng.uniform(-0.25, 0.15) * side
            dx, dy = half * math.cos(tilt), half * math.sin(tilt)
            band = cv.segment_band(x - dx, y - dy, x + dx, y + dy, rng.uniform(0.014, 0.02) * (0.6 + 0.4 * deg))
            cv.D += (sig * 0.4) * band * cv.lungs[side]["mask"]


def _f_effusion(cv: _Canvas, term, rng, sig, deg):
    """Fluid in the costophrenic angle: dense, with a meniscus rising towards the chest wall."""
    sides = _sides(term, rng, "random")
    for side in sides:
        L = cv.lungs[side]
        h = 0.3 * deg ** 1.4 + rng.uniform(-0.015, 0.015)    # meniscus height (fraction of lung height)
        w = np.clip((L["u"] + 1.0) * 0.5, 0.0, 1.0)
        v_men = 1.0 - h * (0.55 + 0.45 * w * w) - 0.05
        fluid = np.clip((L["v"] - v_men) * 12.0, 0.0, 1.0)
        cv.D += (sig * 0.47) * fluid * L["mask"] * (1.0 - np.maximum(cv.heart, cv.med))


def _f_pneumothorax(cv: _Canvas, term, rng, sig, deg):
    """Lucent rim without lung markings, apical/lateral by default, with a thin pleural line."""
    sides = _sides(term, rng, "one")
    zone = _zone(term, "apex")
    f = 1.0 - 0.15 * deg
    for side in sides:
        L = cv.lungs[side]
        mx, _ = cv.lung_point(side, -0.9, 0.0, clamp=False)
        if zone in ("base", "lower lobe"):
            anchor = (mx, cv.p["apex"])                   # deep sulcus: collapse upwards
        else:
            anchor = (mx, cv.p["dome"][side])             # collapse towards the medial base
        d, _, _ = cv.lung(side, shrink=(anchor[0], anchor[1], f))
        inner = _ramp(d, cv.inv_e)
        rim = L["mask"] * (1.0 - inner)
        pleura = _ramp(0.6 * cv.px - np.abs(d), 1.0 / (0.8 * cv.px)) * L["mask"]
        cv.D += sig * (-(cv.p["vessel_amp"] * cv.vessels + 0.07) * rim + 0.2 * pleura)


def _f_lesion(cv: _Canvas, term, rng, sig, deg):
    """Round nodules or a mass; calcified granulomas are small, bright and sharp."""
    head = term.head.lower()
    q = set(term.qualifiers)
    calcified = "calcif" in head or "granulom" in head or "calcified" in q or "calcinosis" in head
    mass = "mass" in head
    multiple = "multiple" in q or "scattered" in q or "granulomatous" in head
    zone = _zone(term, "mid")
    (u0, u1), (v0, v1), forced = _ZONES[zone]
    if multiple:
        n = int(rng.integers(3, 7))
        sides = _sides(term, rng, "both", forced)
    else:
        n = 1
        sides = _sides(term, rng, "one", forced)[:1]
    if zone == "mid":
        (u0, u1), (v0, v1) = (-0.6, 0.7), (0.15, 0.85)
    if zone == "hilum" and calcified:
        (u0, u1), (v0, v1) = (-1.05, -0.8), (0.36, 0.5)
    for k in range(n):
        side = sides[k % len(sides)]
        x, y = cv.lung_point(side, rng.uniform(u0, u1), rng.uniform(v0, v1))
        if calcified:
            r = rng.uniform(0.018, 0.028) * (0.7 + 0.3 * deg)
            cv.D += (sig * 0.75) * cv.disc(x, y, max(r, 0.5 * cv.px), 0.7 * cv.px)
        elif mass:
            r = rng.uniform(0.1, 0.14) * deg
            lob = 1.0 + 0.12 * cv.texture(rng, 10)
            cv.D += (sig * 0.38) * cv.disc(x, y, r, 0.25 * r) * lob
        else:
            r = rng.uniform(0.035, 0.05) * deg
            cv.D += (sig * 0.34) * cv.disc(x, y, max(r, 0.8 * cv.px), 0.35 * r + cv.px)


def _f_fracture(cv: _Canvas, term, rng, sig, deg):
    """A broken bone: by default one posterior rib with a lucent gap, the lateral fragment stepped
    down and a little callus; a clavicle gap or a vertebral compression when the term says so."""
    q = set(term.qualifiers)
    side = _sides(term, rng, "random")[0]
    healed = "healed" in q or "chronic" in q
    ax = cv.x * side
    if "clavicle" in q:
        axf = rng.uniform(0.25, 0.45)
        gap = _ramp(0.02 * deg + 0.5 * cv.px - np.abs(ax - axf), cv.inv_e) * cv.clav
        cv.D += sig * (-0.3 * gap)
        cv.D += (sig * (0.22 if healed else 0.12)) * cv.blob(side * axf, float(_clavicle_y(cv.p, axf)), 0.03)
        return
    if {"thoracic vertebrae", "spine", "lumbar vertebrae"} & q:
        yf = rng.uniform(-0.25, 0.25)
        wedge = _ramp(0.075 - np.abs(cv.x - cv.p["med_x"]), cv.inv_e) * _ramp(0.03 - np.abs(cv.y - yf), cv.inv_e)
        cv.D += (sig * 0.3) * wedge
        return
    k = int(rng.integers(4, 9))                          # which posterior rib, counted from the top
    axf = rng.uniform(0.45, 0.75) * cv.p["lat"]
    ph = cv.rib_phase
    on_side = _ramp(ax, cv.inv_e)
    rib_k = cv.rib * _ramp(0.5 - np.abs(ph - k), 20.0)
    reach = 0.28
    lateral = _ramp(ax - axf, cv.inv_e) * _ramp(axf + reach - ax, cv.inv_e) * on_side
    # displacement of the lateral fragment (in rib periods), largest at the break
    step = (0.45 * deg) * np.clip(1.0 - (ax - axf) * (1.0 / reach), 0.0, 1.0)
    shifted = _rib_profile(ph - step) * _ramp(0.5 - np.abs(ph - step - k), 20.0) * lateral * cv.ribmask
    gap = _ramp(0.02 * deg + 0.5 * cv.px - np.abs(ax - axf), cv.inv_e) * on_side
    cv.D += (sig * 1.6 * cv.rib_w) * (shifted - rib_k * np.maximum(lateral, gap) - 0.5 * gap * rib_k)
    cv.D += (sig * (0.2 if healed else 0.12)) * cv.blob(side * axf, _rib_y(cv, k, axf), 0.03 if healed else 0.024)


def _rib_y(cv: _Canvas, k: int, ax: float) -> float:
    a_arch, b_arch, nrib, _ = cv.p["ribs"]
    t0, t1 = cv.p["apex"] - 0.1, cv.p["dome"][1] + 0.12
    z = min(k / nrib, 1.0) ** (1.0 / 0.8)
    return t0 + z * (t1 - t0) + a_arch * ax + b_arch * ax * ax


def _f_pleural_other(cv: _Canvas, term, rng, sig, deg):
    """Pleural thickening / plaque: a dense band along the inside of the chest wall."""
    q = set(term.qualifiers)
    sides = _sides(term, rng, "one")
    zone = _zone(term, "lateral")
    calcified = "calcified" in q or "calcinosis" in term.head.lower()
    thick = 0.035 * deg + 0.5 * cv.px
    for side in sides:
        L = cv.lungs[side]
        lumpy = thick * np.clip(0.9 + 0.6 * cv.texture(rng, 10), 0.3, 2.0)
        band = _ramp(lumpy - L["d"], cv.inv_e) * L["mask"]
        if zone in ("apex", "upper lobe"):
            where = _ramp(0.3 - L["v"], 8.0)                                   # apical cap
        elif zone in ("base", "lower lobe"):
            where = _ramp(L["v"] - 0.55, 8.0) * _ramp(L["u"] - 0.2, 5.0)
        else:
            where = _ramp(L["u"] - 0.35, 5.0) * _ramp(L["v"] - 0.2, 6.0)
        cv.D += (sig * (0.5 if calcified else 0.36)) * band * where


def _f_devices(cv: _Canvas, term, rng, sig, deg):
    """Support devices: catheters/tubes (thin bright curves), pacemaker box and leads, sternotomy
    wires, ECG electrodes (rings), stents."""
    head = term.head.lower()
    q = set(term.qualifiers)
    D = np.zeros_like(cv.x)
    p = cv.p
    kind = None
    if "implanted" in head or "pacemaker" in head or "defibrillator" in head:
        kind = "pacemaker"
    elif "surgical" in head or "suture" in head or "sternotomy" in head:
        kind = "wires"
    elif "stent" in head:
        kind = "stent"
    elif "tube" in head:
        kind = "tube"
    elif "catheter" in head:
        kind = "ng" if "abdomen" in q else "cvc"
    elif {"cervical vertebrae", "thoracic vertebrae", "lumbar vertebrae", "spine"} & q or "fusion" in head:
        kind = "rods"
    else:
        kind = ("cvc", "ecg", "pacemaker", "wires")[int(rng.integers(0, 4))]
    if kind == "cvc":
        s = _sides(term, rng, "right")[0]
        pts = [(s * 0.95, p["apex"] - 0.0), (s * 0.6, p["apex"] + 0.12), (s * 0.3, p["apex"] + 0.2),
               (-0.06, p["apex"] + 0.36), (-0.07 + rng.normal(0, 0.02), p["heart_cy"] - rng.uniform(0.2, 0.32))]
        D += 0.5 * cv.line(_catmull_rom(pts, 4), 0.008)
    elif kind == "ng":
        pts = [(p["med_x"] + 0.01, -1.05), (p["med_x"] + 0.02, p["carina"]), (0.06, p["dome"][1] - 0.05),
               (0.3, p["dome"][1] + 0.2)]
        D += 0.45 * cv.line(_catmull_rom(pts, 4), 0.009)
    elif kind == "tube":
        tip = p["carina"] - rng.uniform(0.1, 0.2)
        D += 0.45 * cv.line(np.array([[p["med_x"], -1.05], [p["med_x"], tip]]), 0.016)
        pts = [(p["med_x"] + 0.03, -1.05), (p["med_x"] + 0.03, p["carina"]), (0.06, p["dome"][1] - 0.05),
               (0.3, p["dome"][1] + 0.2)]
        D += 0.4 * cv.line(_catmull_rom(pts, 4), 0.008)
    elif kind == "pacemaker":
        s = _sides(term, rng, "left")[0]
        bx, by = s * rng.uniform(0.45, 0.6), p["apex"] + rng.uniform(0.18, 0.26)
        a, b = 0.08, 0.06
        box = _ramp(-np.maximum(np.abs(cv.x - bx) - a, np.abs(cv.y - by) - b), cv.inv_e)
        D += 1.0 * box
        pts = [(bx - s * 0.05, by), (s * 0.2, p["apex"] + 0.2), (-0.03, p["apex"] + 0.4),
               (-0.02, p["heart_cy"] - 0.25), (p["heart_cx"] + 0.25, p["heart_cy"] - 0.08)]
        D += 0.7 * cv.line(_catmull_rom(pts, 4), 0.008)
    elif kind == "wires":
        for k in range(int(rng.integers(4, 7))):
            wy = p["apex"] + 0.4 + 0.1 * k + rng.normal(0, 0.01)
            e = np.hypot((cv.x - p["med_x"]) / 0.03, (cv.y - wy) / 0.018)
            D += 0.9 * _ramp(0.6 * cv.px - np.abs(e - 1.0) * 0.022, 1.0 / (0.8 * cv.px))
    elif kind == "rods":                                 # spinal fixation: paired rods and screws
        if "cervical vertebrae" in q:
            y0, y1 = -1.05, p["apex"] + 0.15
        elif "lumbar vertebrae" in q:
            y0, y1 = p["dome"][1] - 0.1, 1.05
        else:
            y0 = rng.uniform(p["apex"], 0.0)
            y1 = y0 + rng.uniform(0.3, 0.6)
        for sx_ in (-0.045, 0.045):
            D += 0.8 * cv.line(np.array([[p["med_x"] + sx_, y0], [p["med_x"] + sx_, y1]]), 0.01)
        for yy in np.linspace(y0 + 0.04, y1 - 0.04, 4):
            D += 0.6 * cv.line(np.array([[p["med_x"] - 0.07, yy], [p["med_x"] + 0.07, yy]]), 0.008)
    elif kind == "stent":
        sx, sy = rng.uniform(0.0, 0.25), p["heart_cy"] + rng.uniform(-0.3, -0.1)
        core = _ramp(-np.maximum(np.abs(cv.x - sx) - 0.025, np.abs(cv.y - sy) - 0.06), cv.inv_e)
        mesh = 0.6 + 0.4 * np.cos((cv.y - sy) * (2 * math.pi / 0.03))
        D += 0.75 * core * mesh
    if kind == "ecg" or (kind in ("cvc", "pacemaker") and rng.uniform() < 0.5):
        for _ in range(int(rng.integers(2, 5))):
            ex, ey = rng.uniform(-0.7, 0.7), rng.uniform(-0.75, 0.3)
            dd = np.hypot(cv.x - ex, cv.y - ey)
            D += 0.55 * _ramp(0.6 * cv.px - np.abs(dd - 0.04), 1.0 / (0.8 * cv.px))
            D += 0.8 * _ramp(0.012 + 0.4 * cv.px - dd, 1.0 / cv.px)
    cv.D += sig * D


# Findings that change the geometry before the anatomy is drawn.
def _g_cardiomegaly(p: dict, term, sig, deg):
    p["heart_rx"] *= 1.0 + sig * 0.35 * deg
    p["heart_rxr"] *= 1.0 + sig * 0.2 * deg
    p["heart_ry"] *= 1.0 + sig * 0.06 * deg


def _g_cardiomediastinum(p: dict, term, sig, deg):
    p["med_w"] *= 1.0 + sig * 0.6 * deg
    p["knob_r"] *= 1.0 + sig * 0.35 * deg
    p["heart_rx"] *= 1.0 + sig * 0.04 * deg
    p["heart_ry"] *= 1.0 + sig * 0.06 * deg


_GEOMETRIC = {"Cardiomegaly": _g_cardiomegaly, "Enlarged Cardiomediastinum": _g_cardiomediastinum}
_DRAWN = {
    "Lung Opacity": _f_opacity,
    "Lung Lesion": _f_lesion,
    "Edema": _f_edema,
    "Consolidation": _f_consolidation,
    "Pneumonia": _f_pneumonia,
    "Atelectasis": _f_atelectasis,
    "Pneumothorax": _f_pneumothorax,
    "Pleural Effusion": _f_effusion,
    "Pleural Other": _f_pleural_other,
    "Fracture": _f_fracture,
    "Support Devices": _f_devices,
}


#: At difficulty d a finding's contrast factor is Uniform(1 - CONSPICUITY_SPREAD d, 1).
CONSPICUITY_SPREAD = 0.8
#: RMS density of the anatomical-noise field at difficulty 1 (soft tissue is ~0.55).
ANATOMICAL_NOISE = 0.06
#: Blur sigma at difficulty 1, in image half-widths (normalised units).
BLUR_SIGMA = 0.02
#: At difficulty d the quantum noise's standard deviation is multiplied by 1 + QUANTUM_NOISE d.
QUANTUM_NOISE = 2.0


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur (sigma in pixels), edges reflected."""
    return gaussian_filter(img, sigma=sigma_px, mode="reflect").astype(_F32)


def render_phantom(seed_key: str, findings: Sequence[tuple[str, MeshTerm]], size: int = 64,
                   signal: float = 1.0, difficulty: float = 0.0) -> np.ndarray:
    """Render one synthetic PA chest radiograph, uint8 of shape (size, size).

    `seed_key` (the report id, e.g. 'CXR123') fixes the patient's anatomy, exposure and noise and
    the random details of each finding; `findings` are (CheXpert class name, MeshTerm) pairs whose
    qualifiers place and size the finding; `signal` >= 0 multiplies every finding's contrast and
    geometric change (0 gives exactly the no-finding image); `difficulty` in [0, 1] adds per-finding
    conspicuity spread, anatomical noise, blur and quantum noise (see the module docstring; 0 gives
    exactly the images of versions without it).
    """
    size = int(size)
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    signal = float(signal)
    if not signal >= 0.0 or math.isinf(signal):
        raise ValueError(f"signal must be a finite number >= 0, got {signal}")
    d = float(difficulty)
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    key = str(seed_key)
    p = _anatomy_params(_rng(key, "anatomy"))

    items = []
    seen: dict = {}
    for cls, term in findings:
        term = _coerce_term(term)
        ident = (cls, str(term))
        seen[ident] = seen.get(ident, 0) + 1
        sig = signal
        if d > 0.0:  # a stream of its own: the finding's other draws are those of difficulty 0
            sig *= 1.0 - CONSPICUITY_SPREAD * d * _rng(key, "conspicuity", cls, str(term), seen[ident]).uniform()
        items.append((cls, term, _degree(term), _rng(key, "finding", cls, str(term), seen[ident]), sig))

    if signal > 0.0:
        for cls, term, deg, _, sig in items:
            g = _GEOMETRIC.get(cls)
            if g is not None:
                g(p, term, sig, deg)

    cv = _Canvas(size, p)
    _draw_anatomy(cv)
    if signal > 0.0:
        for cls, term, deg, rng, sig in items:
            f = _DRAWN.get(cls)
            if f is not None:
                f(cv, term, rng, sig, deg)
    if d > 0.0:
        crng = _rng(key, "clutter")
        clutter = 0.7 * _smooth_noise(crng, size, 10) + 0.7 * _smooth_noise(crng, size, 18)
        body = _ramp(p["torso"] - np.abs(cv.x), cv.inv_e / 3.0)
        cv.D += (ANATOMICAL_NOISE * d) * clutter * body

    k, gamma, lo, hi, heel, sigma = p["exposure"]
    img = 1.0 - np.exp(np.maximum(cv.D, 0.0) * (-k))
    img = img ** gamma
    img = lo + (hi - lo) * img + (heel * cv.ax)[None, :]
    if d > 0.0:
        img = _blur(img, BLUR_SIGMA * d * size / 2.0)
        sigma = sigma * (1.0 + QUANTUM_NOISE * d)
    nrng = _rng(key, "noise")
    img += nrng.standard_normal((size, size), dtype=_F32) * sigma
    img += 0.012 * _smooth_noise(nrng, size, 6)
    return np.clip(img * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)


def _short_title(title: str, width: int) -> str:
    text = str(title)
    for long, short in _ABBREV.items():
        text = text.replace(long, short)
    lines = textwrap.wrap(text, width=width, break_long_words=True) or [""]
    if len(lines) > 3:
        lines = lines[:3]
        lines[-1] = lines[-1][: max(width - 1, 1)] + "\u2026"
    return "\n".join(lines)


def contact_sheet(images: Sequence[np.ndarray], titles: Sequence[str], path, columns: int = 6) -> None:
    """Write a PNG grid of `images` (grey uint8, any sizes) to `path`, each under its title (class
    names abbreviated, wrapped to three short lines).  Uses matplotlib's Agg canvas directly, so
    no GUI backend and no pyplot state are touched."""
    images = list(images)
    titles = list(titles) + [""] * max(0, len(images) - len(titles))
    n = max(len(images), 1)
    columns = max(1, min(int(columns), n))
    rows = (n + columns - 1) // columns
    fig = Figure(figsize=(2.0 * columns, 2.45 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    for i, axis in enumerate(axes.ravel()):
        axis.set_axis_off()
        if i < len(images):
            axis.imshow(np.asarray(images[i]), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            axis.set_title(_short_title(titles[i], 26), fontsize=6.5, pad=2)
    fig.tight_layout(pad=0.4, h_pad=0.6, w_pad=0.3)
    fig.savefig(path, dpi=110, format="png")
