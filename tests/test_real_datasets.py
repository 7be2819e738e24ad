"""The real-dataset loaders on miniature copies of each release (tests/data_fixtures.py): records,
views, labels, texts and splits as the release defines them, `vkd-pyro data check`, and one epoch of
`vkd-pyro train` on each (ChestX-ray14 fine-tuned from the MIMIC-CXR run, as in the paper's Table 1)."""

import gzip
import json

import numpy as np
import pandas as pd
import pytest
import torch
from data_fixtures import build_chestxray14, build_mimic_cxr, build_openi
from PIL import Image
from torch.utils.data import DataLoader

from vkd_pyro.classes import CLASS_INDEX, CLASSES
from vkd_pyro.cli import main
from vkd_pyro.data.batching import collate
from vkd_pyro.data.chestxray14 import ChestXray14Dataset
from vkd_pyro.data.labels import label_vector
from vkd_pyro.data.mimic_cxr import MIMICCXRDataset, parse_sections, report_text
from vkd_pyro.data.openi import OpenIDataset, image_views, view_of

SHARED7 = ["Cardiomegaly", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion"]
TINY = ["data.image_size=32", "data.num_workers=0", "image_encoder.name=small_cnn", "image_encoder.weights=none",
        "image_encoder.width=4", "image_encoder.out_features=16", "model.z_dim=16", "model.hidden=[16]",
        "train.max_epochs=1", "train.batch_size=8", "inference.test_samples=2", "train.progress=false",
        "device=cpu", "text_encoder.name=all-MiniLM-L6-v2", "text_encoder.block_width=16",
        "text_encoder.block_heads=2", "text_encoder.block_ffn=32"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return {"root": root, "cache": root / "cache", "openi": build_openi(root / "openi"),
            "mimic": build_mimic_cxr(root / "mimic"), "cxr14": build_chestxray14(root / "cxr14", rows=60)}


def _grey(path, size=32):
    with Image.open(path) as image:
        return np.asarray(image.convert("L").resize((size, size), Image.BILINEAR))


# --------------------------------------------------------------------------- OpenI


def test_openi_views_come_from_tsne_then_dicom_with_the_cxr1_alias():
    tsne, dicom = image_views(__import__("pathlib").Path("/no/such/folder"))  # torchxrayvision's copies
    assert dicom["CXR10_IM-0002-1001"] == "PA" and view_of("CXR10_IM-0002-1001", tsne, dicom) == "L"  # t-SNE wins
    assert view_of("CXR1_1_IM-0001-3001", tsne, dicom) == "L"
    assert "CXR1_1_IM-0001-4001" not in dicom and view_of("CXR1_1_IM-0001-4001", tsne, dicom) == "PA"  # alias
    assert view_of("CXR999999_IM-0000-0000", tsne, dicom) == "unknown"


def test_openi_records_labels_texts_and_pixels(base):
    fx = base["openi"]
    ds = OpenIDataset(str(fx.root), reports=str(fx.files["reports"]), image_size=32, cache_dir=base["cache"])
    assert len(ds) == fx.records == 35
    assert ds.skipped == {"no FINDINGS or IMPRESSION text": 1, "report without images": 1}
    assert ds.skipped_examples["no FINDINGS or IMPRESSION text"] == ["CXR16"]
    assert ds.texts is not None and not hasattr(ds, "official_split")
    by_uid = {r.uid: r for r in fx.extra["reports"]}
    assert set(ds.views) <= {"PA", "AP"} and len(set(ds.groups)) == len(ds)  # first frontal image per report
    for i in range(len(ds)):
        report = by_uid[ds.groups[i]]
        item = ds[i]
        assert item["img"].shape == (1, 32, 32) and item["img"].dtype == torch.float32 and "lab_mask" not in item
        assert np.array_equal(item["lab"].numpy(), label_vector(report.major))
        assert ds.texts[i] == report.text() and ds.csv.at[i, "record"] in report.image_ids
    cxr1 = ds.groups.index("CXR1")
    assert ds.csv.at[cxr1, "record"] == "CXR1_1_IM-0001-4001"  # t-SNE calls 3001 lateral
    assert ds.csv.at[ds.groups.index("CXR10"), "record"] != "CXR10_IM-0002-1001"
    assert np.array_equal((ds[cxr1]["img"][0].numpy() * 255).round(), _grey(fx.root / "CXR1_1_IM-0001-4001.png"))


def test_openi_all_frontal_images_keep_each_report_in_one_split(base):
    fx = base["openi"]
    first = OpenIDataset(str(fx.root), reports=str(fx.files["reports"]), image_size=32, cache_dir=base["cache"])
    every = OpenIDataset(str(fx.root), reports=str(fx.files["reports"]), image_size=32, multi_image="all",
                         cache_dir=base["cache"])
    assert len(every) == len(first) + first.selection["further frontal images not used (multi_image=first)"]
    assert len(every) > len(first) and set(every.groups) == set(first.groups)
    from vkd_pyro.data.splits import dataset_splits

    splits = dataset_splits(every, [0.6, 0.2, 0.2], 0)
    owner = {}
    for name, idx in splits.items():
        for i in idx:
            assert owner.setdefault(every.groups[i], name) == name  # no report straddles two splits
    assert sum(len(v) for v in splits.values()) == len(every)


# --------------------------------------------------------------------------- MIMIC-CXR


REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. Dr. ___ was
 told at 10:30 by phone.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def test_report_sections_are_parsed_from_capital_headers():
    sections = parse_sections(REPORT)
    assert sections[""] == "FINAL REPORT" and sections["EXAMINATION"] == "CHEST (PA AND LAT)"
    assert sections["FINDINGS"].startswith("There is no focal") and sections["FINDINGS"].endswith("at 10:30 by phone.")
    assert sections["IMPRESSION"] == "No acute cardiopulmonary process."
    assert report_text(sections) == sections["FINDINGS"] + " " + sections["IMPRESSION"]
    assert report_text(sections, include_indication=True).startswith("___F with new onset ascites")
    combined = parse_sections("FINDINGS AND IMPRESSION:\n  Clear lungs.\nNOTIFICATION:  none\n")
    assert report_text(combined) == "Clear lungs."
    assert report_text(parse_sections("COMPARISON: none\nTECHNIQUE: PA\n")) == ""


def _decoded_table(path):
    with gzip.open(path) as f:
        return pd.read_csv(f)


@pytest.mark.parametrize("policy, blank", [("zeros", "zeros"), ("ones", "zeros"), ("ignore", "ignore")])
def test_mimic_labels_follow_the_chexpert_table_and_the_policies(base, policy, blank):
    fx = base["mimic"]
    ds = MIMICCXRDataset(str(fx.root), image_size=32, label_policy=policy, blank_policy=blank, cache_dir=base["cache"])
    assert len(ds) == fx.records and ds.skipped == {}
    table = _decoded_table(fx.files["chexpert"]).set_index("study_id")
    values = table.loc[[int(s[1:]) for s in ds.csv["study"]], list(CLASSES)].to_numpy()
    uncertain, blank_cells = values == -1.0, np.isnan(values)
    assert uncertain.any() and blank_cells.any() and (values == 1.0).any()
    assert np.array_equal(ds.labels[values == 1.0], np.ones((values == 1.0).sum()))
    assert (ds.labels[values == 0.0] == 0).all() and (ds.labels[blank_cells] == 0).all()
    assert (ds.labels[uncertain] == (1.0 if policy == "ones" else 0.0)).all()
    if policy == "ignore":
        assert np.array_equal(ds.label_mask, (~(uncertain | blank_cells)).astype(np.float32))
        batch = collate([ds[i] for i in range(4)])
        assert batch.label_mask is not None and torch.equal(batch.label_mask, torch.from_numpy(ds.label_mask[:4]))
    else:
        assert ds.label_mask is None and "lab_mask" not in ds[0]


def test_mimic_records_views_reports_and_official_split(base):
    fx = base["mimic"]
    ds = MIMICCXRDataset(str(fx.root), image_size=32, cache_dir=base["cache"])
    assert [str(p) for p in ds.csv["path"]] == [str(p) for p in fx.images]  # the first frontal image per study
    assert set(ds.views) == {"PA", "AP"} and ds.selection["lateral or other views not used"] == fx.extra["studies"]
    split = _decoded_table(fx.files["split"]).set_index("dicom_id")["split"]
    names = {"train": "train", "validate": "validation", "test": "test"}
    for name, idx in ds.official_split.items():
        assert all(names[split[ds.csv.at[i, "record"]]] == name for i in idx)
    assert sum(len(v) for v in ds.official_split.values()) == len(ds)
    assert len(ds.official_split["validation"]) and len(ds.official_split["test"])
    for i, path in enumerate(fx.reports):
        assert ds.texts[i] == report_text(parse_sections(path.read_text()))
    every = MIMICCXRDataset(str(fx.root), image_size=32, multi_image="all", cache_dir=base["cache"])
    assert len(every) == fx.records + fx.extra["studies"] // 3


def test_loader_workers_give_the_same_batches(base):
    fx = base["mimic"]
    ds = MIMICCXRDataset(str(fx.root), image_size=32, cache_dir=base["cache"])
    serial = [b.images for b in DataLoader(ds, batch_size=8, collate_fn=collate)]
    parallel = [b.images for b in DataLoader(ds, batch_size=8, collate_fn=collate, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel)) and len(serial) == len(parallel) == 3


# --------------------------------------------------------------------------- ChestX-ray14


def test_chestxray14_labels_mask_and_official_split(base):
    fx = base["cxr14"]
    ds = ChestXray14Dataset(str(fx.root), image_size=32, val_fraction=0.25, cache_dir=base["cache"])
    assert len(ds) == fx.records == 60 and ds.texts is None and ds.skipped == {}
    table = pd.read_csv(fx.files["table"]).set_index("Image Index")
    known = {"No Finding", *SHARED7}
    for i in range(len(ds)):
        findings = table.at[ds.csv.at[i, "record"], "Finding Labels"].split("|")
        item = ds[i]
        expected = {("Pleural Effusion" if f == "Effusion" else f) for f in findings} & known
        assert {c for c in CLASSES if item["lab"][CLASS_INDEX[c]] == 1} == expected
        assert {c for c in CLASSES if item["lab_mask"][CLASS_INDEX[c]] == 1} == known
    test_names = set(fx.files["test"].read_text().split())
    assert {ds.csv.at[i, "record"] for i in ds.official_split["test"]} == test_names
    train_patients = {ds.groups[i] for i in ds.official_split["train"]}
    val_patients = {ds.groups[i] for i in ds.official_split["validation"]}
    assert val_patients and not (train_patients & val_patients)
    assert len(ds.official_split["train"]) + len(ds.official_split["validation"]) == len(ds) - len(test_names)


def test_chestxray14_refuses_objectives_that_read_reports(base, capsys):
    code = main(["data", "check", "--config", "configs/chestxray14_finetune.yaml", f"data.root={base['cxr14'].root}",
                 "inference.objective=vkd", f"cache_dir={base['cache']}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "reads reports, but chestxray14 has none; use inference.objective=image_only" in err


# --------------------------------------------------------------------------- the CLI, end to end


@pytest.mark.parametrize("config, root", [("openi", "openi"), ("mimic_cxr", "mimic"), ("chestxray14_finetune", "cxr14")])
def test_data_check_prints_the_card(base, config, root, capsys, tmp_path):
    fx = base[root]
    extra = [f"data.reports={fx.files['reports']}"] if root == "openi" else []
    card_file = tmp_path / "card.json"
    assert main(["data", "check", "--config", f"configs/{config}.yaml", "--json", str(card_file),
                 f"data.root={fx.root}", f"cache_dir={base['cache']}", "data.image_size=32", "data.multi_image=first",
                 *extra]) == 0
    out = capsys.readouterr().out
    card = json.loads(card_file.read_text())
    assert f"records: {fx.records} " in out and "positives" in out and "Pleural Effusion" in out
    assert card["records"] == fx.records == sum(s["records"] for s in card["splits"].values())
    assert card["split_source"] == ("official" if root != "openi" else "by group, fractions [0.7, 0.1, 0.2], seed 0")
    if root == "openi":
        assert "1  no FINDINGS or IMPRESSION text" in out and card["reports"]["records_without_text"] == 0
    if root == "cxr14":
        assert "reports: none (image-only dataset" in out and card["masked_labels"]
        assert card["splits"]["train"]["known"]["Fracture"] == 0
    if root == "mimic":
        assert card["views"] == {"PA": 9, "AP": 9} and card["label_policy"] == {"uncertain": "zeros", "blank": "zeros"}
    positives = sum(s["positives"]["Pleural Effusion"] for s in card["splits"].values())
    assert positives > 0


@pytest.fixture(scope="module")
def mimic_run(base):
    out = base["root"] / "run-mimic"
    assert main(["train", "--config", "configs/mimic_cxr.yaml", "--out", str(out), f"data.root={base['mimic'].root}",
                 f"cache_dir={base['cache']}", "data.label_policy=ignore", *TINY]) == 0
    return out


def test_one_epoch_on_mimic_with_masked_uncertain_labels(mimic_run):
    metrics = json.loads((mimic_run / "metrics.json").read_text())
    assert metrics["dataset"] == "mimic_cxr" and metrics["objective"] == "vkd" and metrics["skipped"] == {}
    assert metrics["n_test"] == 4 and metrics["eval_classes"] is None  # multi_image=all: 3 studies, 4 images
    assert metrics["best_epoch"] == 1


def test_one_epoch_on_openi(base, capsys):
    out = base["root"] / "run-openi"
    fx = base["openi"]
    assert main(["train", "--config", "configs/openi.yaml", "--out", str(out), f"data.root={fx.root}",
                 f"data.reports={fx.files['reports']}", f"cache_dir={base['cache']}", *TINY]) == 0
    log = capsys.readouterr().out
    assert "openi: 35 records; 1 left out (no FINDINGS or IMPRESSION text); 1 left out (report without images)" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped"] == {"no FINDINGS or IMPRESSION text": 1, "report without images": 1}
    assert metrics["n_test"] == 7


def test_chestxray14_fine_tuned_from_the_mimic_run_reports_the_shared_classes(base, mimic_run, capsys):
    out = base["root"] / "run-cxr14"
    assert main(["train", "--config", "configs/chestxray14_finetune.yaml", "--out", str(out),
                 f"init_from={mimic_run}", f"data.root={base['cxr14'].root}", "data.val_fraction=0.25",
                 f"cache_dir={base['cache']}", *TINY]) == 0
    log = capsys.readouterr().out
    assert f"init_from {mimic_run / 'checkpoint.pt'}: loaded " in log and "(2 absent here, 0 of another shape)" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["objective"] == "image_only" and metrics["eval_classes"] == SHARED7
    assert all(metrics["auc"][c] is None for c in CLASSES if c not in SHARED7)  # No Finding has positives, not scored
    assert metrics["positives"]["No Finding"] > 0 and metrics["positives"]["Fracture"] == 0
    assert any(metrics["auc"][c] is not None for c in SHARED7)
    defined = [metrics["auc"][c] for c in SHARED7 if metrics["auc"][c] is not None]
    assert metrics["macro_auc"] == pytest.approx(sum(defined) / len(defined))


def test_evaluate_rebuilds_the_dataset_from_the_image_cache(base, mimic_run, monkeypatch):
    from vkd_pyro.data import image_cache

    before = json.loads((mimic_run / "metrics.json").read_text())
    monkeypatch.setattr(image_cache, "decode_image", lambda *a: pytest.fail("decoded again despite the cache"))
    assert main(["evaluate", "--run", str(mimic_run)]) == 0
    after = json.loads((mimic_run / "metrics.json").read_text())
    assert after["n_test"] == before["n_test"] and after["positives"] == before["positives"]
