"""`mimic_cxr`: MIMIC-CXR-JPG 2.0.0 images with the MIMIC-CXR free-text reports.

Layout (`data.root`, the MIMIC-CXR-JPG 2.0.0 folder):

- `mimic-cxr-2.0.0-metadata.csv.gz`: one row per image: dicom_id, subject_id, study_id,
  ViewPosition (PA, AP, LATERAL, LL, ... or blank), Rows, Columns, ...;
- `mimic-cxr-2.0.0-chexpert.csv.gz`: one row per study: subject_id, study_id and the 14 CheXpert
  classes coded 1.0 (positive), 0.0 (negative), -1.0 (uncertain) or blank (not mentioned);
- `mimic-cxr-2.0.0-split.csv.gz`: dicom_id, study_id, subject_id, split (train, validate, test);
- images `files/p<first 2 digits of subject>/p<subject_id>/s<study_id>/<dicom_id>.jpg`.

Reports (`data.reports`, null = `data.root`; from MIMIC-CXR 2.0.0's mimic-cxr-reports.zip):
`files/p<..>/p<subject_id>/s<study_id>.txt`, free text whose sections start with a header in
capitals followed by a colon at the start of a line (`FINDINGS:`, `IMPRESSION:`, ...;
`parse_sections`). The text the guide reads is FINDINGS + IMPRESSION (INDICATION first if asked).

Records: the images whose ViewPosition is one of `data.views` (PA and AP by default);
`data.multi_image` `first` keeps the first such image of a study (metadata order), `all` keeps
each. Split: the official one (validate -> validation). Labels, per study: `data.label_policy`
maps uncertain (-1.0) to 0 (`zeros`, the paper), 1 (`ones`) or leaves it out of the likelihood
(`ignore`: the record's "lab_mask" is 0 there); `data.blank_policy` maps blank (not mentioned) to
0 (`zeros`) or leaves it out (`ignore`). Bad records (`data.on_bad_record`): a missing, corrupt or
truncated image, a missing, empty or malformed (not UTF-8) report, a study without a label row, an
image without a split row. Reports without FINDINGS or IMPRESSION are left out and counted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from vkd_pyro.classes import CLASSES, NUM_CLASSES
from vkd_pyro.data.records import BadRecords, XRayDataset, first_groups, read_table, require_folder
from vkd_pyro.errors import DataError

SOURCE = ("MIMIC-CXR-JPG 2.0.0 from https://physionet.org/content/mimic-cxr-jpg/2.0.0/ and its reports "
          "(mimic-cxr-reports.zip) from https://physionet.org/content/mimic-cxr/2.0.0/, credentialed access")
METADATA = "mimic-cxr-2.0.0-metadata.csv.gz"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv.gz"
SPLIT = "mimic-cxr-2.0.0-split.csv.gz"
SPLIT_NAMES = {"train": "train", "validate": "validation", "test": "test"}

_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z0-9 &/,()'-]*?)[ \t]*:", re.MULTILINE)


def parse_sections(text: str) -> dict[str, str]:
    """The sections of a MIMIC-CXR report: header -> its text, whitespace collapsed.

    A header is a line that starts (after spaces) with a word in capitals and goes on in capitals,
    digits, spaces or `&/,()'-` up to a colon; the section runs to the next header. Text before the
    first header is under "" (e.g. "FINAL REPORT"). A header seen twice keeps both texts, joined.
    `FINDINGS AND IMPRESSION:` is returned as it is; `report_text` reads it as both.
    """
    sections: dict[str, str] = {}
    matches = list(_HEADER.finditer(text))
    starts = [(m.start(), m.end(), " ".join(m.group(1).split())) for m in matches]
    preamble = text[:starts[0][0]] if starts else text
    if preamble.strip():
        sections[""] = " ".join(preamble.split())
    for k, (_, end, name) in enumerate(starts):
        stop = starts[k + 1][0] if k + 1 < len(starts) else len(text)
        body = " ".join(text[end:stop].split())
        sections[name] = f"{sections[name]} {body}".strip() if name in sections else body
    return sections


def report_text(sections: dict[str, str], include_indication: bool = False) -> str:
    """FINDINGS + IMPRESSION of parsed sections (INDICATION first if asked); "" when neither."""
    findings = sections.get("FINDINGS") or sections.get("FINDINGS AND IMPRESSION") or ""
    impression = sections.get("IMPRESSION") or ""
    if not findings and not impression:
        return ""
    parts = ([sections.get("INDICATION", "")] if include_indication else []) + [findings, impression]
    return " ".join(p for p in parts if p)


def study_folder(subject_id: int, study_id: int) -> str:
    """`files/p10/p10000032/s50414267`: a study's folder relative to the release root."""
    subject = f"p{int(subject_id)}"
    return f"files/{subject[:3]}/{subject}/s{int(study_id)}"


def read_report(path: Path) -> tuple[Optional[str], str]:
    """(sections text or None, reason): the reason a report file cannot be used, "" when it can."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "report file missing"
    except OSError as exc:
        return None, f"report file unreadable ({type(exc).__name__})"
    if not data.strip():
        return None, "empty report"
    if b"\0" in data:
        return None, "malformed report (binary data, not text)"
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, "malformed report (not UTF-8 text)"


def chexpert_labels(table: pd.DataFrame, label_policy: str, blank_policy: str,
                    where: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels (R, 14), known (R, 14)) of the rows of a CheXpert-coded label table.

    1.0 -> 1 and 0.0 -> 0; uncertain (-1.0) -> 0 (`zeros`), 1 (`ones`) or unknown (`ignore`); blank
    -> 0 (`zeros`) or unknown (`ignore`). Unknown entries have label 0 and known 0. Any other value
    is a DataError naming the table (`where`), the column and the row.
    """
    values = table[list(CLASSES)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    raw = table[list(CLASSES)]
    invalid = (~np.isin(values, (1.0, 0.0, -1.0)) & ~np.isnan(values)) | (np.isnan(values) & raw.notna().to_numpy())
    if invalid.any():
        r, c = map(int, np.argwhere(invalid)[0])
        raise DataError(f"{where}: line {r + 2}, column {CLASSES[c]!r} holds {str(raw.iat[r, c])!r}; "
                        f"expected 1.0, 0.0, -1.0 or blank ({SOURCE})")
    blank = np.isnan(values)
    uncertain = values == -1.0
    labels = (values == 1.0).astype(np.float32)
    known = np.ones_like(labels)
    if label_policy == "ones":
        labels[uncertain] = 1.0
    elif label_policy == "ignore":
        known[uncertain] = 0.0
    if blank_policy == "ignore":
        known[blank] = 0.0
    return labels, known


class MIMICCXRDataset(XRayDataset):
    """MIMIC-CXR-JPG images with their study's report and labels (see the module docstring)."""

    def __init__(self, root: Optional[str], reports: Optional[str] = None, image_size: int = 224,
                 views=("PA", "AP"), multi_image: str = "first", label_policy: str = "zeros",
                 blank_policy: str = "zeros", include_indication: bool = False, on_bad_record: str = "error",
                 max_reports: Optional[int] = None, cache_dir: Optional[os.PathLike] = None, workers: int = 0,
                 say=None):
        expected = f"{METADATA}, {CHEXPERT}, {SPLIT} and files/pXX/pSUBJECT/sSTUDY/DICOM.jpg"
        folder = require_folder(root, "mimic_cxr", expected, SOURCE)
        report_root = (require_folder(reports, "mimic_cxr", "the reports files/pXX/pSUBJECT/sSTUDY.txt", SOURCE,
                                      key="data.reports") if reports else folder)
        meta = read_table(folder / METADATA, "MIMIC-CXR-JPG metadata table", SOURCE,
                          ["dicom_id", "subject_id", "study_id", "ViewPosition"], dtype={"dicom_id": str})
        chexpert = read_table(folder / CHEXPERT, "MIMIC-CXR-JPG CheXpert label table", SOURCE,
                              ["subject_id", "study_id", *CLASSES])
        split = read_table(folder / SPLIT, "MIMIC-CXR-JPG split table", SOURCE,
                           ["dicom_id", "study_id", "subject_id", "split"], dtype={"dicom_id": str})
        unknown_splits = sorted(set(split["split"].astype(str)) - set(SPLIT_NAMES))
        if unknown_splits:
            raise DataError(f"{folder / SPLIT}: split column holds {unknown_splits[:3]}; expected train, "
                            f"validate or test ({SOURCE})")
        bad = BadRecords(on_bad_record)
        wanted = {v.upper() for v in views}
        view = meta["ViewPosition"].astype(object).where(meta["ViewPosition"].notna(), "")
        view = view.map(lambda v: str(v).strip().upper())
        selection = {"lateral or other views not used": int(((view != "") & ~view.isin(wanted)).sum()),
                     "images without ViewPosition not used": int((view == "").sum())}
        frontal = meta.assign(view=view)[view.isin(wanted)]
        chosen = first_groups(frontal["study_id"], max_reports)
        if chosen is not None:
            frontal = frontal[frontal["study_id"].isin(chosen)]
        if multi_image == "first":
            first = ~frontal.duplicated("study_id", keep="first")
            selection["further frontal images not used (multi_image=first)"] = int((~first).sum())
            frontal = frontal[first]
        all_labels, all_known = chexpert_labels(chexpert, label_policy, blank_policy, str(folder / CHEXPERT))
        split_of = dict(zip(split["dicom_id"], split["split"].astype(str)))
        label_rows = {}
        for index, (subject, study) in enumerate(zip(chexpert["subject_id"], chexpert["study_id"])):
            label_rows.setdefault((int(subject), int(study)), index)

        rows, labels, masks, texts = [], [], [], []
        report_cache: dict[tuple, tuple] = {}
        for dicom, subject, study, v in zip(frontal["dicom_id"], frontal["subject_id"], frontal["study_id"],
                                            frontal["view"]):
            subject, study = int(subject), int(study)
            image_path = folder / study_folder(subject, study) / f"{dicom}.jpg"
            record = f"{image_path} (dicom_id {dicom})"
            if dicom not in split_of:
                bad(record, f"image without a row in {SPLIT}")
                continue
            row_index = label_rows.get((subject, study))
            if row_index is None:
                bad(record, f"study s{study} without a label row in {CHEXPERT}")
                continue
            key = (subject, study)
            if key not in report_cache:
                report_path = report_root / f"{study_folder(subject, study)}.txt"
                raw, reason = read_report(report_path)
                text = report_text(parse_sections(raw), include_indication) if raw is not None else ""
                report_cache[key] = (report_path, text, reason)
            report_path, text, reason = report_cache[key]
            if reason:
                bad(f"{report_path} (study s{study}, image {dicom})", reason)
                continue
            if not text:
                bad.leave_out(f"{report_path} (image {dicom})", "no FINDINGS or IMPRESSION text")
                continue
            rows.append({"record": dicom, "path": str(image_path), "group": f"p{subject}", "study": f"s{study}",
                         "view": v, "split": SPLIT_NAMES[split_of[dicom]]})
            labels.append(all_labels[row_index])
            masks.append(all_known[row_index])
            texts.append(text)
        records = pd.DataFrame(rows, columns=["record", "path", "group", "study", "view", "split"])
        labels = np.stack(labels) if labels else np.zeros((0, NUM_CLASSES), np.float32)
        masked = "ignore" in (label_policy, blank_policy)
        mask = (np.stack(masks) if masks else np.zeros((0, NUM_CLASSES), np.float32)) if masked else None
        super().__init__("mimic_cxr", records, labels, mask, texts, image_size, cache_dir, bad,
                         selection=selection, workers=workers, say=say)
