"""`openi_phantom`: the real OpenI reports, each paired with a rendered frontal phantom radiograph.

Source: the 3,955 reports of OpenI's `NLMCXR_reports.tgz` (the copy torchxrayvision ships, or
`data.root`); no image file is read. Records: one per report (record and group: its uid, view: PA);
those with neither FINDINGS nor IMPRESSION are left out and counted (`skipped`). Labels are the
14 CheXpert classes derived from each report's MeSH major terms and, for uncertain mentions
(`borderline` terms, hedged sentences), its FINDINGS + IMPRESSION text under `label_policy`
(zeros | ones | ignore: `vkd_pyro.data.labels.report_labels`; `ignore` gives a `label_mask`, 0 where
a label is uncertain); the text: FINDINGS + IMPRESSION (INDICATION first if asked). The image is
rendered from the same terms (`vkd_pyro.data.phantom`) and cached on disk,
`<cache_dir>/phantom/<key>.npy`, keyed by the renderer version, size, signal, difficulty and the
reports' terms; an entry that cannot be used (unreadable, truncated, of another shape or dtype) is
rendered again and replaced, with the image cache's `CorruptCacheWarning` naming it. Items are
those of every `XRayDataset`.
"""

from __future__ import annotations

import hashlib
import os
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from vkd_pyro.classes import NUM_CLASSES
from vkd_pyro.data.image_cache import read_cached_images, warn_corrupt
from vkd_pyro.data.labels import findings_of, report_labels
from vkd_pyro.data.openi_reports import Report, read_reports
from vkd_pyro.data.phantom import RENDERER_VERSION, render_phantom
from vkd_pyro.data.records import BadRecords, XRayDataset
from vkd_pyro.files import atomic_path

#: The view of every phantom (`vkd_pyro.data.phantom` draws PA films).
VIEW = "PA"


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


class OpenIPhantomDataset(XRayDataset):
    """OpenI reports with rendered phantom radiographs (see the module docstring); `reports` holds
    each record's `Report`."""

    def __init__(self, root: Optional[str] = None, image_size: int = 64, signal: float = 1.0,
                 include_indication: bool = False, max_reports: Optional[int] = None,
                 cache_dir: Optional[os.PathLike] = None, render_workers: int = 2, label_policy: str = "zeros",
                 difficulty: float = 0.0):
        bad = BadRecords("error")
        kept = []
        for report in read_reports(root):
            if report.has_text:
                kept.append(report)
            else:  # counted over the whole archive, before max_reports
                bad.leave_out(report.uid, "no FINDINGS or IMPRESSION text")
        self.reports = kept[:max_reports] if max_reports is not None else kept
        self.signal, self.difficulty, self.label_policy = signal, difficulty, label_policy
        uids = [r.uid for r in self.reports]
        records = pd.DataFrame({"record": uids, "group": uids, "view": VIEW,
                                "mesh_major": ["; ".join(map(str, r.major)) for r in self.reports]},
                               columns=["record", "group", "view", "mesh_major"])
        labelled = [report_labels(r.major, r.text(), label_policy) for r in self.reports]
        labels = np.stack([lab for lab, _ in labelled]) if labelled else np.zeros((0, NUM_CLASSES), np.float32)
        # a mask only where labels can be unknown (as mimic_cxr): none under zeros / ones
        mask = None
        if label_policy == "ignore":
            mask = np.stack([known for _, known in labelled]) if labelled else np.zeros((0, NUM_CLASSES), np.float32)
        texts = [r.text(include_indication) for r in self.reports]
        super().__init__("openi_phantom", records, labels, mask, texts, image_size, cache_dir, bad,
                         workers=render_workers)

    def load_images(self, records: pd.DataFrame, cache_dir: Optional[os.PathLike],
                    on_bad: Callable[[int, str, str], None], workers: int, say) -> np.ndarray:
        """The phantoms of `self.reports` (records' rows), rendered in `workers` processes or read from
        the cache (a corrupt entry is rendered again, with a warning naming it); a rendered image is
        never bad, so `on_bad` is not called."""
        # difficulty 0 renders what versions without it rendered: it keys the cache only when set
        hard = (("difficulty", float(self.difficulty)),) if self.difficulty else ()
        key = hashlib.sha256(repr((RENDERER_VERSION, self.image_size, self.signal,
                                   [(r.uid, tuple(map(str, r.major))) for r in self.reports]) + hard
                                  ).encode()).hexdigest()[:24]
        path = Path(cache_dir) / "phantom" / f"{key}.npy" if cache_dir is not None else None
        if path is not None and path.is_file():
            images, why = read_cached_images(path, len(self.reports), self.image_size, mmap_mode=None)
            if images is not None:
                return images
            warn_corrupt(path, why, f"rendering the {len(self.reports)} phantoms again")
        images = render_reports(self.reports, self.image_size, self.signal, workers, self.difficulty)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path, suffix=".npy") as tmp:
                np.save(tmp, images, allow_pickle=False)
        return images
