"""`openi`: the real OpenI (Indiana University) chest X-rays, each with its report.

Layout (`data.root`): a folder of the NLMCXR PNG images, `<parentImage id>.png` (the archive
NLMCXR_png.tgz from OpenI). Reports: `data.reports`, the report archive NLMCXR_reports.tgz or a
folder of `ecgen-radiology/<n>.xml`; null = the copy torchxrayvision ships.

Which images are frontal. torchxrayvision ships two view tables, read from `data.root` when a
file of that name is there, else from torchxrayvision's copy:

- `nlmcxr_tsne_pa.csv.gz` (`imageid`, `tsne-view` PA or L): a view derived from the pixels (a
  t-SNE projection) for the FIRST image of every report that has one (3,851 images);
- `nlmcxr_dicom_metadata.csv.gz` (`imageid`, `View Position` PA, AP, LL, LATERAL, RL, ... or
  blank): the DICOM header of 7,467 images, blank for a third of them and noisier (it calls 180
  of the images t-SNE calls lateral PA). Its ids match the reports' parentImage ids except that
  report CXR1's images are `CXR1_1_IM-...` in the reports and `CXR1_IM-...` here: an id is looked
  up as it is, then with a `_<k>` after `CXR<n>` removed.

An image's view is its t-SNE view when it has one (more reliable), else its DICOM View Position,
else `unknown`; it is used when its view is one of `data.views` (default PA and AP). Of the
3,927 reports with text this gives one frontal image to 2,390, two or more to 1,222 and none to
315 (101 of which have no image at all).

Records: reports with neither FINDINGS nor IMPRESSION, without images or without a frontal image
are left out and counted (`skipped`). `data.multi_image`: `first` uses the first frontal image of
a report (in parentImage order), `all` each as a record of its own; the split is by report (the
group), so no report straddles two splits. Labels: `vkd_pyro.data.labels.report_labels` on the
report's MeSH major terms and FINDINGS + IMPRESSION text: uncertain mentions (`borderline` terms,
hedged sentences) follow `data.label_policy` (zeros | ones | ignore: masked, `label_mask`); the
text: FINDINGS + IMPRESSION (INDICATION first if asked).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from vkd_pyro.data.labels import report_labels
from vkd_pyro.data.openi_reports import default_archive, read_reports, xrv_datapath
from vkd_pyro.data.records import BadRecords, XRayDataset, first_groups, read_table, require_folder

SOURCE = ("OpenI, Indiana University chest X-rays: images NLMCXR_png.tgz from https://openi.nlm.nih.gov/faq, "
          "reports NLMCXR_reports.tgz (torchxrayvision ships a copy)")
DICOM_METADATA = "nlmcxr_dicom_metadata.csv.gz"
TSNE_VIEWS = "nlmcxr_tsne_pa.csv.gz"
_ALIAS = re.compile(r"^(CXR\d+)_\d+_(IM-.*)$")


def view_table_file(root: Path, name: str) -> Path:
    """`root/name` when it exists, else torchxrayvision's shipped copy of `name`."""
    local = root / name
    return local if local.is_file() else xrv_datapath() / name


def image_views(root: Path) -> tuple[dict, dict]:
    """(t-SNE view by image id, DICOM View Position by image id), from the two view tables."""
    tsne = read_table(view_table_file(root, TSNE_VIEWS), "OpenI t-SNE view table", SOURCE, ["imageid", "tsne-view"])
    dicom = read_table(view_table_file(root, DICOM_METADATA), "OpenI DICOM metadata table", SOURCE,
                       ["imageid", "View Position"], usecols=lambda c: c in ("imageid", "View Position"))
    tsne_views = {str(k): str(v).strip().upper() for k, v in zip(tsne["imageid"], tsne["tsne-view"]) if isinstance(v, str)}
    dicom_views = {str(k): str(v).strip().upper() for k, v in zip(dicom["imageid"], dicom["View Position"])
                   if isinstance(v, str) and v.strip()}
    return tsne_views, dicom_views


def view_of(image_id: str, tsne_views: dict, dicom_views: dict) -> str:
    """The view of one image: t-SNE's (PA or L), else the DICOM View Position, else `unknown`."""
    alias = _ALIAS.sub(r"\1_\2", image_id)
    for table in (tsne_views, dicom_views):
        for key in (image_id, alias):
            if key in table:
                return table[key]
    return "unknown"


class OpenIDataset(XRayDataset):
    """OpenI images and reports (see the module docstring)."""

    def __init__(self, root: Optional[str], reports: Optional[str] = None, image_size: int = 224,
                 views=("PA", "AP"), multi_image: str = "first", include_indication: bool = False,
                 on_bad_record: str = "error", max_reports: Optional[int] = None,
                 cache_dir: Optional[os.PathLike] = None, workers: int = 0, say=None,
                 label_policy: str = "zeros"):
        folder = require_folder(root, "openi", "the NLMCXR PNG images <parentImage id>.png", SOURCE)
        archive = Path(os.path.expanduser(reports)) if reports else default_archive()
        bad = BadRecords(on_bad_record)
        all_reports = read_reports(archive, on_bad=bad)
        tsne_views, dicom_views = image_views(folder)
        wanted = {v.upper() for v in views}
        chosen_groups = first_groups((r.uid for r in all_reports), max_reports)
        selection = {"lateral or other views not used": 0, "images of unknown view not used": 0,
                     "further frontal images not used (multi_image=first)": 0}
        rows, labels, known, texts = [], [], [], []
        for report in all_reports:
            if chosen_groups is not None and report.uid not in chosen_groups:
                continue
            if not report.has_text:
                bad.leave_out(report.uid, "no FINDINGS or IMPRESSION text")
                continue
            if not report.major:
                bad(report.uid, "report without MeSH major terms (no labels)")
                continue
            if not report.image_ids:
                bad.leave_out(report.uid, "report without images")
                continue
            frontal = []
            for image_id in report.image_ids:
                view = view_of(image_id, tsne_views, dicom_views)
                if view in wanted:
                    frontal.append((image_id, view))
                elif view == "unknown":
                    selection["images of unknown view not used"] += 1
                else:
                    selection["lateral or other views not used"] += 1
            if not frontal:
                bad.leave_out(report.uid, "report without a frontal image")
                continue
            if multi_image == "first":
                selection["further frontal images not used (multi_image=first)"] += len(frontal) - 1
                frontal = frontal[:1]
            vector, report_known = report_labels(report.major, report.text(), label_policy)
            text = report.text(include_indication)
            for image_id, view in frontal:
                rows.append({"record": image_id, "path": str(folder / f"{image_id}.png"), "group": report.uid,
                             "view": view, "mesh_major": "; ".join(map(str, report.major))})
                labels.append(vector)
                known.append(report_known)
                texts.append(text)
        if multi_image != "first":
            del selection["further frontal images not used (multi_image=first)"]
        records = pd.DataFrame(rows, columns=["record", "path", "group", "view", "mesh_major"])
        labels = np.stack(labels) if labels else np.zeros((0, 14), np.float32)
        mask = (np.stack(known) if known else np.zeros((0, 14), np.float32)) if label_policy == "ignore" else None
        super().__init__("openi", records, labels, mask, texts, image_size, cache_dir, bad,
                         selection=selection, workers=workers, say=say)
