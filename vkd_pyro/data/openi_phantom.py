"""`openi_phantom`: the real OpenI reports, each paired with a rendered frontal phantom radiograph.

Records are the 3,955 reports of OpenI's `NLMCXR_reports.tgz` (the copy torchxrayvision ships, or
`data.root`); those with neither FINDINGS nor IMPRESSION are left out and counted. Labels are the
14 CheXpert classes derived from each report's MeSH major terms and, for uncertain mentions
(`borderline` terms, hedged sentences), its FINDINGS + IMPRESSION text under `label_policy`
(zeros | ones | ignore: `vkd_pyro.data.labels.report_labels`; `ignore` gives a `label_mask`, 0 where
a label is uncertain); the image is rendered from the same terms (`vkd_pyro.data.phantom`) and
cached on disk, keyed by the renderer version, size, signal, difficulty and the reports' terms. Items follow torchxrayvision's dataset convention:
a dict with "idx", "img" (1, H, W) float in [0, 1], "lab" (14,) and the report "text".
"""

from __future__ import annotations

import hashlib
import os
import uuid
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from vkd_pyro.classes import CLASSES
from vkd_pyro.data.labels import findings_of, report_labels
from vkd_pyro.data.openi_reports import Report, read_reports
from vkd_pyro.data.phantom import RENDERER_VERSION, render_phantom


def _render_one(job: tuple) -> np.ndarray:
    uid, findings, size, signal, difficulty = job
    return render_phantom(uid, findings, size=size, signal=signal, difficulty=difficulty)


def render_reports(reports: list[Report], size: int, signal: float, workers: int = 1,
                   difficulty: float = 0.0) -> np.ndarray:
    """Phantom radiographs (N, size, size) uint8 for `reports`, rendered from their MeSH terms."""
    jobs = [(r.uid, findings_of(r.major), size, signal, difficulty) for r in reports]
    if workers > 1 and len(jobs) >= 256:
        with get_context("fork").Pool(workers) as pool:
            images = pool.map(_render_one, jobs, chunksize=64)
    else:
        images = [_render_one(job) for job in jobs]
    return np.stack(images) if images else np.zeros((0, size, size), np.uint8)


class OpenIPhantomDataset(Dataset):
    """OpenI reports with rendered phantom radiographs (see the module docstring)."""

    pathologies = list(CLASSES)

    def __init__(self, root: Optional[str] = None, image_size: int = 64, signal: float = 1.0,
                 include_indication: bool = False, max_reports: Optional[int] = None,
                 cache_dir: Optional[os.PathLike] = None, render_workers: int = 2, label_policy: str = "zeros",
                 difficulty: float = 0.0):
        reports = read_reports(root)
        kept = [r for r in reports if r.has_text]
        self.skipped = {"no FINDINGS or IMPRESSION text": len(reports) - len(kept)}
        if max_reports is not None:
            kept = kept[:max_reports]
        self.reports = kept
        self.texts = [r.text(include_indication) for r in kept]
        self.groups = [r.uid for r in kept]
        labelled = [report_labels(r.major, r.text(), label_policy) for r in kept]
        self.labels = np.stack([lab for lab, _ in labelled]).astype(np.float32)
        self.label_policy = label_policy
        # a mask only where labels can be unknown (as mimic_cxr): none under zeros / ones
        self.label_mask = (np.stack([known for _, known in labelled]).astype(np.float32)
                           if label_policy == "ignore" else None)
        self.csv = pd.DataFrame({"uid": self.groups, "text": self.texts,
                                 "mesh_major": ["; ".join(map(str, r.major)) for r in kept]})
        self.image_size, self.signal, self.difficulty = image_size, signal, difficulty
        self.images = self._cached_images(cache_dir, render_workers)

    def _cached_images(self, cache_dir, workers) -> np.ndarray:
        # difficulty 0 renders what versions without it rendered: it keys the cache only when set
        hard = (("difficulty", float(self.difficulty)),) if self.difficulty else ()
        key = hashlib.sha256(repr((RENDERER_VERSION, self.image_size, self.signal,
                                   [(r.uid, tuple(map(str, r.major))) for r in self.reports]) + hard
                                  ).encode()).hexdigest()[:24]
        path = Path(cache_dir) / "phantom" / f"{key}.npy" if cache_dir is not None else None
        if path is not None and path.is_file():
            images = np.load(path)
            if images.shape == (len(self.reports), self.image_size, self.image_size):
                return images
        images = render_reports(self.reports, self.image_size, self.signal, workers, self.difficulty)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, images)
            os.replace(tmp, path)
        return images

    def __len__(self) -> int:
        return len(self.reports)

    def __getitem__(self, idx: int) -> dict:
        img = torch.from_numpy(self.images[idx]).float().div_(255.0).unsqueeze(0)
        item = {"idx": idx, "img": img, "lab": torch.from_numpy(self.labels[idx])}
        if self.label_mask is not None:
            item["lab_mask"] = torch.from_numpy(self.label_mask[idx])
        return item
