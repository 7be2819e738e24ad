"""Miniature copies of the real dataset releases, built in a temporary folder for the tests.

Each builder writes the files of one release in its real layout (same file names, folders,
compressed tables, column names and value codings) with a few dozen records drawn from the real
tables that torchxrayvision ships, and small phantom images (`render_phantom`) in place of the
pixels, which are not on this machine:

- `build_openi(root)`: real OpenI report XMLs (copied byte for byte from NLMCXR_reports.tgz) in a
  small `NLMCXR_reports.tgz`, the real rows of `nlmcxr_dicom_metadata.csv.gz` and
  `nlmcxr_tsne_pa.csv.gz` for their images, and `<parentImage id>.png` files;
- `build_mimic_cxr(root)`: MIMIC-CXR-JPG 2.0.0's three `.csv.gz` tables, with label rows drawn
  from the real CheXpert table (`chexpert_train.csv.gz`: the same 14 columns and 1.0/0.0/-1.0/blank
  coding), JPEGs under `files/pXX/pSUBJECT/sSTUDY/` and report texts `files/pXX/pSUBJECT/sSTUDY.txt`
  written in MIMIC-CXR's layout (header lines in capitals with a colon) from real OpenI report text;
- `build_chestxray14(root)`: the first rows of the real `Data_Entry_2017_v2020.csv`, the official
  list files (by patient) and `images/*.png`.

Each returns a `Fixture` with the paths and what a loader should find.
"""

from __future__ import annotations

import functools
import gzip
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from vkd_pyro.classes import CLASSES
from vkd_pyro.data.labels import findings_of
from vkd_pyro.data.openi_reports import MeshTerm, Report, default_archive, parse_report_xml, xrv_datapath
from vkd_pyro.data.phantom import render_phantom

#: OpenI reports of the miniature archive: CXR1..CXR36 (CXR16 has no text) and CXR1068 (no image).
OPENI_REPORTS = tuple(range(1, 37)) + (1068,)
MIMIC_CHEXPERT_COLUMNS = ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                          "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding",
                          "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"]
MIMIC_METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                          "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                          "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]


@dataclass
class Fixture:
    """A miniature dataset: its root, its files, and what a loader should make of them."""

    root: Path
    records: int  # records a loader keeps (multi_image=first, views PA and AP, nothing bad)
    files: dict = field(default_factory=dict)  # name -> path of the tables and lists
    images: list = field(default_factory=list)  # the image files of the records a loader keeps
    reports: list = field(default_factory=list)  # mimic_cxr: the report files of those records
    extra: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=1)
def real_openi_xml() -> dict[int, bytes]:
    """Report number -> the XML bytes of that report in torchxrayvision's NLMCXR_reports.tgz."""
    out = {}
    with tarfile.open(default_archive(), "r|gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".xml"):
                out[int(Path(member.name).stem)] = tar.extractfile(member).read()
    return out


def real_openi_report(number: int) -> Report:
    return parse_report_xml(real_openi_xml()[number], f"{number}.xml")


def _datapath(name: str) -> Path:
    return xrv_datapath() / name


def _save_image(array: np.ndarray, path: Path, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)


def _phantom(key: str, findings, size: int = 48, width: int | None = None) -> np.ndarray:
    """A phantom radiograph; `width` != size resamples it to a non-square picture, as real ones are."""
    image = render_phantom(key, findings, size=size)
    if width is not None and width != size:
        image = np.asarray(Image.fromarray(image).resize((width, size), Image.BILINEAR))
    return image


def write_tgz(members: dict[str, bytes], path: Path) -> None:
    """A gzip-compressed tar archive of `members` (name -> bytes)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------- OpenI


def build_openi(root: Path, numbers=OPENI_REPORTS) -> Fixture:
    """root/images/<id>.png, root/NLMCXR_reports.tgz and root/images/nlmcxr_*.csv.gz (real rows)."""
    from vkd_pyro.data.openi import image_views, view_of

    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    xml = real_openi_xml()
    members = {f"ecgen-radiology/{n}.xml": xml[n] for n in numbers}
    write_tgz(members, root / "NLMCXR_reports.tgz")
    reports = [real_openi_report(n) for n in numbers]
    ids = [i for r in reports for i in r.image_ids]
    for report in reports:
        for image_id in report.image_ids:
            _save_image(_phantom(image_id, findings_of(report.major), 48, 40), images / f"{image_id}.png")
    # The real view tables, cut down to these images (ids as they appear there, CXR1's alias included).
    dicom = pd.read_csv(_datapath("nlmcxr_dicom_metadata.csv.gz"), low_memory=False)
    aliases = set(ids) | {i.replace("CXR1_1_", "CXR1_") for i in ids}
    dicom[dicom["imageid"].isin(aliases)].to_csv(images / "nlmcxr_dicom_metadata.csv.gz", index=False)
    tsne = pd.read_csv(_datapath("nlmcxr_tsne_pa.csv.gz"))
    tsne[tsne["imageid"].isin(set(ids))].to_csv(images / "nlmcxr_tsne_pa.csv.gz", index=False)
    tsne_views, dicom_views = image_views(images)
    kept = []
    for report in reports:
        if not report.has_text or not report.major:
            continue
        frontal = [i for i in report.image_ids if view_of(i, tsne_views, dicom_views) in ("PA", "AP")]
        if frontal:
            kept.append(frontal[0])
    return Fixture(images, len(kept), files={"reports": root / "NLMCXR_reports.tgz"},
                   images=[images / f"{i}.png" for i in kept], extra={"reports": reports})


# --------------------------------------------------------------------------- MIMIC-CXR-JPG


def mimic_report_text(report: Report) -> str:
    """A MIMIC-CXR style report file (header lines in capitals with a colon) with OpenI report text."""
    s = report.sections
    parts = ["                                 FINAL REPORT",
             " EXAMINATION:  CHEST (PA AND LAT)", "",
             f" INDICATION:  {s.get('INDICATION') or '___ with cough'}", "",
             " TECHNIQUE:  Chest PA and lateral", "",
             f" COMPARISON:  {s.get('COMPARISON', 'None.')}", ""]
    if s.get("FINDINGS"):
        words = s["FINDINGS"].split()
        lines = [" " + " ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
        parts += [" FINDINGS:", ""] + lines + [""]
    if s.get("IMPRESSION"):
        parts += [" IMPRESSION:", "", " " + s["IMPRESSION"], ""]
    return "\n".join(parts) + "\n"


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(rng.integers(0, 2 ** 32)):08x}" for _ in range(5))


def build_mimic_cxr(root: Path, subjects: int = 12) -> Fixture:
    """A MIMIC-CXR-JPG 2.0.0 folder: 12 patients, 1-2 studies each, a frontal (PA or AP) and a lateral
    image per study and a second frontal image in every third study; patients 10-11 in validate, 8-9
    in test. Labels: real CheXpert rows; reports: real OpenI findings and impressions."""
    root = Path(root)
    rng = np.random.default_rng(0)
    chexpert = pd.read_csv(_datapath("chexpert_train.csv.gz"), nrows=200)
    texts = [real_openi_report(n) for n in sorted(real_openi_xml()) if 100 <= n < 200]
    texts = [r for r in texts if r.sections.get("FINDINGS") and r.sections.get("IMPRESSION")]
    meta_rows, label_rows, split_rows, kept_images, kept_reports = [], [], [], [], []
    study_number = 0
    for k in range(subjects):
        subject = 10000032 + 1117 * k
        split = "validate" if k >= subjects - 2 else "test" if k >= subjects - 4 else "train"
        for s in range(1 + k % 2):
            study = 50414267 + 7919 * study_number
            report = texts[study_number % len(texts)]
            label = chexpert.iloc[study_number]
            study_number += 1
            folder = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}"
            views = ["PA" if study_number % 2 else "AP", "LATERAL"] + (["AP"] if study_number % 3 == 0 else [])
            findings = [(c, MeshTerm(c)) for c in CLASSES[1:] if label[c] == 1.0]
            for j, view in enumerate(views):
                dicom = _dicom_id(rng)
                image = _phantom(f"{study}-{j}", findings, 56, 48)
                _save_image(image, folder / f"{dicom}.jpg", quality=90)
                meta_rows.append({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                                  "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": view,
                                  "Rows": image.shape[0], "Columns": image.shape[1], "StudyDate": 21800506,
                                  "StudyTime": 213014.531, "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                                  "ViewCodeSequence_CodeMeaning": "postero-anterior" if view == "PA" else
                                  "antero-posterior" if view == "AP" else "lateral",
                                  "PatientOrientationCodeSequence_CodeMeaning": "Erect"})
                split_rows.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": split})
                if j == 0:
                    kept_images.append(folder / f"{dicom}.jpg")
            report_path = folder.with_suffix(".txt")
            report_path.write_text(mimic_report_text(report))
            kept_reports.append(report_path)
            label_rows.append({"subject_id": subject, "study_id": study,
                               **{c: label[c] for c in MIMIC_CHEXPERT_COLUMNS[2:]}})
    files = {"metadata": root / "mimic-cxr-2.0.0-metadata.csv.gz", "chexpert": root / "mimic-cxr-2.0.0-chexpert.csv.gz",
             "split": root / "mimic-cxr-2.0.0-split.csv.gz"}
    pd.DataFrame(meta_rows, columns=MIMIC_METADATA_COLUMNS).to_csv(files["metadata"], index=False)
    pd.DataFrame(label_rows, columns=MIMIC_CHEXPERT_COLUMNS).to_csv(files["chexpert"], index=False)
    pd.DataFrame(split_rows, columns=["dicom_id", "study_id", "subject_id", "split"]).to_csv(files["split"], index=False)
    return Fixture(root, len(kept_images), files=files, images=kept_images, reports=kept_reports,
                   extra={"studies": study_number})


# --------------------------------------------------------------------------- ChestX-ray14

CXR14_SHARED = {"Cardiomegaly": "Cardiomegaly", "Edema": "Edema", "Consolidation": "Consolidation",
                "Pneumonia": "Pneumonia", "Atelectasis": "Atelectasis", "Pneumothorax": "Pneumothorax",
                "Effusion": "Pleural Effusion"}


def build_chestxray14(root: Path, rows: int = 40, test_patients: int = 3) -> Fixture:
    """A ChestX-ray14 folder: the first `rows` rows of the real Data_Entry_2017_v2020 table, its
    patients' images as images/*.png (one as RGBA, as a few real ones are), and official lists by
    patient: the last `test_patients` patients in test_list.txt, the others in train_val_list.txt."""
    root = Path(root)
    table = pd.read_csv(_datapath("Data_Entry_2017_v2020.csv.gz"), nrows=rows)
    files = {"table": root / "Data_Entry_2017_v2020.csv", "train_val": root / "train_val_list.txt",
             "test": root / "test_list.txt"}
    root.mkdir(parents=True, exist_ok=True)
    table.to_csv(files["table"], index=False)
    patients = list(dict.fromkeys(table["Patient ID"]))
    test = set(patients[-test_patients:])
    is_test = table["Patient ID"].isin(test)
    files["test"].write_text("\n".join(table.loc[is_test, "Image Index"]) + "\n")
    files["train_val"].write_text("\n".join(table.loc[~is_test, "Image Index"]) + "\n")
    images = []
    for i, (name, found) in enumerate(zip(table["Image Index"], table["Finding Labels"])):
        findings = [(CXR14_SHARED[f], MeshTerm(CXR14_SHARED[f])) for f in found.split("|") if f in CXR14_SHARED]
        image = _phantom(name, findings, 48)
        if i == 1:
            image = np.dstack([image, image, image, np.full_like(image, 255)])
        _save_image(image, root / "images" / name)
        images.append(root / "images" / name)
    return Fixture(root, len(table), files=files, images=images,
                   extra={"patients": len(patients), "test_images": int(is_test.sum())})


# --------------------------------------------------------------------------- damage


def corrupt(path: Path) -> None:
    """Overwrite a file with bytes that are no image."""
    Path(path).write_bytes(b"this is not an image\n" * 8)


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to its first `keep` fraction of bytes (a half-written download)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:int(len(data) * keep)])


def rewrite_gz_csv(path: Path, edit) -> None:
    """Apply `edit` (DataFrame -> DataFrame) to a .csv.gz table in place."""
    table = pd.read_csv(path, dtype={"dicom_id": str})
    edit(table).to_csv(path, index=False)


def read_gz_text(path: Path) -> str:
    return gzip.decompress(Path(path).read_bytes()).decode()
