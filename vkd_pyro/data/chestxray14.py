"""`chestxray14`: NIH ChestX-ray14, images and labels only (no reports).

Layout (`data.root`): `Data_Entry_2017_v2020.csv` (`Image Index`, `Finding Labels` joined by `|`,
`Follow-up #`, `Patient ID`, `Patient Age`, `Patient Gender`, `View Position`, ...; a .csv.gz of
the same name is read when the .csv is absent), `train_val_list.txt` and `test_list.txt` (one
image file name a line) and `images/<Image Index>`.

There are no reports, so the guide has nothing to read: train with `inference.objective=image_only`,
usually fine-tuning a model trained on MIMIC-CXR (`init_from`, the paper's Table 1).

Labels: ChestX-ray14's labeller shares 7 classes with the 14 CheXpert classes: Cardiomegaly,
Edema, Consolidation, Pneumonia, Atelectasis, Pneumothorax and Effusion (-> Pleural Effusion); its
`No Finding` is kept as No Finding. The other 6 classes (Enlarged Cardiomediastinum, Lung Opacity,
Lung Lesion, Pleural Other, Fracture, Support Devices) are unknown for every record: "lab_mask" is
0 there, so they never train as negatives. ChestX-ray14's own Infiltration, Mass, Nodule,
Emphysema, Fibrosis, Pleural_Thickening and Hernia name no class of the 14 and are dropped.

Split: the official lists. `test_list.txt` is the test split; validation is carved from
`train_val_list.txt` by patient (`data.val_fraction` of its patients, a stable hash order), so no
patient straddles train and validation. Bad records (`data.on_bad_record`): a missing, corrupt or
truncated image, a listed image without a row in the table, an image in neither list, a
`Finding Labels` value that is empty or unknown.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from vkd_pyro.classes import CLASS_INDEX, NUM_CLASSES
from vkd_pyro.data.records import BadRecords, XRayDataset, first_groups, read_table, require_file, require_folder
from vkd_pyro.data.splits import split_by_group

SOURCE = "NIH ChestX-ray14 from https://nihcc.app.box.com/v/ChestXray-NIHCC"
DATA_ENTRY = "Data_Entry_2017_v2020.csv"
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
#: ChestX-ray14 finding -> CheXpert class, for the findings the two labellers share (and No Finding).
SHARED = {"No Finding": "No Finding", "Cardiomegaly": "Cardiomegaly", "Edema": "Edema",
          "Consolidation": "Consolidation", "Pneumonia": "Pneumonia", "Atelectasis": "Atelectasis",
          "Pneumothorax": "Pneumothorax", "Effusion": "Pleural Effusion"}
#: ChestX-ray14's findings that name none of the 14 classes.
NOT_SHARED = ("Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
#: The 8 of the 14 classes that a ChestX-ray14 record has a label for (the rest are masked out).
KNOWN_CLASSES = tuple(SHARED.values())


def label_row(findings: str) -> tuple[np.ndarray, list[str]]:
    """(labels (14,), unknown names) of one `Finding Labels` value such as `Cardiomegaly|Effusion`."""
    labels = np.zeros(NUM_CLASSES, np.float32)
    unknown = []
    for name in (part.strip() for part in str(findings).split("|")):
        if name in SHARED:
            labels[CLASS_INDEX[SHARED[name]]] = 1.0
        elif name not in NOT_SHARED:
            unknown.append(name)
    return labels, unknown


def known_mask() -> np.ndarray:
    """(14,) float32: 1 for the 8 classes a ChestX-ray14 record is labelled for, 0 for the others."""
    mask = np.zeros(NUM_CLASSES, np.float32)
    for name in KNOWN_CLASSES:
        mask[CLASS_INDEX[name]] = 1.0
    return mask


def read_list(path: Path) -> list[str]:
    """The image names of an official list file, one a line, blank lines ignored."""
    require_file(path, f"the official list {path.name} (one image file name a line)", SOURCE)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class ChestXray14Dataset(XRayDataset):
    """ChestX-ray14 images with their 8 known labels and the official split (see the module docstring)."""

    def __init__(self, root: Optional[str], image_size: int = 224, views=("PA", "AP"),
                 val_fraction: float = 0.1, split_seed: int = 0, on_bad_record: str = "error",
                 max_reports: Optional[int] = None, cache_dir: Optional[os.PathLike] = None, workers: int = 0,
                 say=None):
        expected = f"{DATA_ENTRY}, {TRAIN_VAL_LIST}, {TEST_LIST} and images/*.png"
        folder = require_folder(root, "chestxray14", expected, SOURCE)
        table_path = folder / DATA_ENTRY
        if not table_path.is_file() and (folder / f"{DATA_ENTRY}.gz").is_file():
            table_path = folder / f"{DATA_ENTRY}.gz"
        table = read_table(table_path, "ChestX-ray14 label table", SOURCE,
                           ["Image Index", "Finding Labels", "Patient ID", "View Position"],
                           dtype={"Image Index": str, "Finding Labels": str})
        train_val = read_list(folder / TRAIN_VAL_LIST)
        test = read_list(folder / TEST_LIST)
        bad = BadRecords(on_bad_record)
        official = {name: "test" for name in test}
        for name in train_val:
            official.setdefault(name, "train_val")
        in_table = set(table["Image Index"])
        for name in dict.fromkeys(train_val + test):
            if name not in in_table:
                bad(f"{folder / 'images' / name} (listed in {TRAIN_VAL_LIST if official[name] == 'train_val' else TEST_LIST})",
                    f"image without a label row in {DATA_ENTRY}")

        table = table.drop_duplicates("Image Index", keep="first")
        view = table["View Position"].astype(object).where(table["View Position"].notna(), "")
        view = view.map(lambda v: str(v).strip().upper())
        wanted = {v.upper() for v in views}
        selection = {"other views not used": int((~view.isin(wanted)).sum())}
        table = table.assign(view=view)[view.isin(wanted)]
        chosen = first_groups(table["Patient ID"].astype(str), max_reports)
        if chosen is not None:
            table = table[table["Patient ID"].astype(str).isin(chosen)]

        rows, labels = [], []
        for name, findings, patient, v in zip(table["Image Index"], table["Finding Labels"], table["Patient ID"],
                                              table["view"]):
            path = folder / "images" / name
            record = f"{path} (Image Index {name})"
            if name not in official:
                bad(record, f"image in neither {TRAIN_VAL_LIST} nor {TEST_LIST}")
                continue
            if not isinstance(findings, str) or not findings.strip():
                bad(record, f"empty Finding Labels in {DATA_ENTRY}")
                continue
            vector, unknown = label_row(findings)
            if unknown:
                bad(record, f"unknown finding label in {DATA_ENTRY}", ", ".join(unknown))
                continue
            rows.append({"record": name, "path": str(path), "group": f"patient{patient}", "view": v,
                         "split": official[name], "finding_labels": findings})
            labels.append(vector)
        records = pd.DataFrame(rows, columns=["record", "path", "group", "view", "split", "finding_labels"])
        # Validation: val_fraction of the train_val patients, by a stable hash order of patient ids.
        train_val_rows = np.flatnonzero(records["split"].to_numpy() == "train_val")
        carve = split_by_group([records.at[i, "group"] for i in train_val_rows],
                               [1.0 - val_fraction, val_fraction, 0.0], split_seed)
        split = records["split"].to_numpy(dtype=object)
        split[train_val_rows[carve["train"]]] = "train"
        split[train_val_rows[carve["validation"]]] = "validation"
        records["split"] = split
        labels = np.stack(labels) if labels else np.zeros((0, NUM_CLASSES), np.float32)
        mask = np.tile(known_mask(), (len(records), 1))
        super().__init__("chestxray14", records, labels, mask, None, image_size, cache_dir, bad,
                         selection=selection, workers=workers, say=say)
