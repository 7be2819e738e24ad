"""Bad input to the real-dataset loaders: a missing root or table is one line naming the path, what
belongs there and where the dataset comes from (exit status 2); a bad record (missing, corrupt or
truncated image, empty or malformed report, missing label row) stops the build under
`data.on_bad_record=error` and is left out and counted under `skip`: in the dataset card, the
training log and metrics.json, with every candidate record accounted for."""

import json
import os

import numpy as np
import pytest
from data_fixtures import (
    build_chestxray14,
    build_mimic_cxr,
    build_openi,
    corrupt,
    real_openi_xml,
    rewrite_gz_csv,
    truncate,
    write_tgz,
)

from vkd_pyro.cli import main
from vkd_pyro.data import image_cache
from vkd_pyro.data.chestxray14 import ChestXray14Dataset
from vkd_pyro.data.mimic_cxr import MIMICCXRDataset
from vkd_pyro.data.openi import OpenIDataset
from vkd_pyro.errors import DataError


def _check(capsys, config, *overrides):
    """(exit status, stdout, stderr) of `vkd-pyro data check`."""
    code = main(["data", "check", "--config", f"configs/{config}.yaml", "data.image_size=32",
                 "data.multi_image=first", *overrides])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("vkd-pyro: error: ") and "Traceback" not in err
    return err


# --------------------------------------------------------------------------- missing root or table


@pytest.mark.parametrize("config, expected, source", [
    ("openi", "expected the NLMCXR PNG images <parentImage id>.png there", "https://openi.nlm.nih.gov/faq"),
    ("mimic_cxr", "expected mimic-cxr-2.0.0-metadata.csv.gz, mimic-cxr-2.0.0-chexpert.csv.gz, "
                  "mimic-cxr-2.0.0-split.csv.gz and files/", "https://physionet.org/content/mimic-cxr-jpg/2.0.0/"),
    ("chestxray14_finetune", "expected Data_Entry_2017_v2020.csv, train_val_list.txt, test_list.txt and images/*.png",
     "https://nihcc.app.box.com/v/ChestXray-NIHCC"),
])
def test_a_missing_root_is_one_line_with_what_and_where_from(config, expected, source, tmp_path, capsys):
    missing = tmp_path / "not-here"
    code, _, err = _check(capsys, config, f"data.root={missing}", f"cache_dir={tmp_path}")
    assert code == 2
    err = _one_error_line(err)
    assert f"{missing}: folder not found" in err and expected in err and source in err


@pytest.mark.parametrize("dataset, remove, message", [
    ("mimic", "split", "mimic-cxr-2.0.0-split.csv.gz: not found; expected MIMIC-CXR-JPG split table there"),
    ("mimic", "chexpert", "mimic-cxr-2.0.0-chexpert.csv.gz: not found; expected MIMIC-CXR-JPG CheXpert label table"),
    ("cxr14", "test", "test_list.txt: not found; expected the official list test_list.txt"),
    ("cxr14", "table", "Data_Entry_2017_v2020.csv: not found; expected ChestX-ray14 label table there"),
])
def test_a_missing_table_is_one_line(dataset, remove, message, tmp_path, capsys):
    fx = build_mimic_cxr(tmp_path / "d") if dataset == "mimic" else build_chestxray14(tmp_path / "d", rows=12)
    os.remove(fx.files[remove])
    config = "mimic_cxr" if dataset == "mimic" else "chestxray14_finetune"
    code, _, err = _check(capsys, config, f"data.root={fx.root}", f"cache_dir={tmp_path}")
    assert code == 2
    err = _one_error_line(err)
    assert message in err and ("physionet.org" in err or "nihcc" in err)


def test_a_missing_openi_report_archive_is_one_line(tmp_path, capsys):
    fx = build_openi(tmp_path / "openi", numbers=(1, 2, 4))
    code, _, err = _check(capsys, "openi", f"data.root={fx.root}", f"data.reports={tmp_path / 'none.tgz'}")
    assert code == 2
    assert "none.tgz: OpenI report archive not found" in _one_error_line(err) and "torchxrayvision" in err


def test_a_table_without_a_column_or_with_a_bad_code_is_one_line(tmp_path, capsys):
    fx = build_mimic_cxr(tmp_path / "d", subjects=3)
    rewrite_gz_csv(fx.files["chexpert"], lambda t: t.drop(columns=["Edema"]))
    code, _, err = _check(capsys, "mimic_cxr", f"data.root={fx.root}", f"cache_dir={tmp_path}")
    assert code == 2 and "lacks column(s) Edema" in _one_error_line(err)
    fx = build_mimic_cxr(tmp_path / "e", subjects=3)
    rewrite_gz_csv(fx.files["chexpert"], lambda t: t.assign(Edema=[2.0] + [0.0] * (len(t) - 1)))
    with pytest.raises(DataError, match=r"chexpert.csv.gz: line 2, column 'Edema' holds '2.0'; expected 1.0, 0.0, -1.0 or blank"):
        MIMICCXRDataset(str(fx.root), image_size=32)


# --------------------------------------------------------------------------- bad records


def _damage_mimic(fx):
    """Five bad records of five kinds; returns their number."""
    corrupt(fx.images[0])  # not an image
    truncate(fx.images[1])  # a half-written JPEG
    os.remove(fx.images[2])  # a missing image file
    fx.reports[3].write_text("  \n")  # an empty report
    fx.reports[4].write_bytes(b"FINDINGS: \x00\xff\xfe garbage")  # not text
    study = int(fx.reports[5].stem[1:])
    rewrite_gz_csv(fx.files["chexpert"], lambda t: t[t["study_id"] != study])  # a missing label row
    return 6


def test_mimic_bad_records_stop_the_build_or_are_counted(tmp_path, capsys):
    fx = build_mimic_cxr(tmp_path / "d")
    bad = _damage_mimic(fx)
    with pytest.raises(DataError) as error:  # the first bad record, found while building: no training yet
        MIMICCXRDataset(str(fx.root), image_size=32, cache_dir=tmp_path / "c")
    message = str(error.value)
    assert "\n" not in message and "data.on_bad_record=skip" in message
    assert str(fx.reports[3]) in message and "empty report" in message  # records are checked in order
    assert not list((tmp_path / "c").rglob("*.npy"))  # nothing half-built was cached

    ds = MIMICCXRDataset(str(fx.root), image_size=32, on_bad_record="skip", cache_dir=tmp_path / "c")
    assert ds.skipped == {"empty report": 1, "malformed report (binary data, not text)": 1,
                          "study s%s without a label row in mimic-cxr-2.0.0-chexpert.csv.gz" % fx.reports[5].stem[1:]: 1,
                          "unreadable image (corrupt or truncated)": 2, "image file missing": 1}
    assert len(ds) + sum(ds.skipped.values()) == fx.records and sum(ds.skipped.values()) == bad  # nothing lost
    kept = set(ds.csv["path"])
    assert not kept & {str(p) for p in fx.images[:6]} and kept == {str(p) for p in fx.images[6:]}
    assert str(fx.images[0]) in ds.skipped_examples["unreadable image (corrupt or truncated)"][0]

    code, out, _ = _check(capsys, "mimic_cxr", f"data.root={fx.root}", f"cache_dir={tmp_path / 'c'}",
                          "data.on_bad_record=skip")
    assert code == 0
    assert f"skipped ({bad} in all, data.on_bad_record=skip):" in out
    assert "     2  unreadable image (corrupt or truncated)" in out and "     1  empty report" in out
    code, _, err = _check(capsys, "mimic_cxr", f"data.root={fx.root}", f"cache_dir={tmp_path / 'c'}")
    assert code == 2 and "empty report; set data.on_bad_record=skip" in _one_error_line(err)


def test_skipped_records_reach_the_training_log_and_metrics(tmp_path, capsys):
    from test_real_datasets import TINY

    fx = build_mimic_cxr(tmp_path / "d")
    corrupt(fx.images[0])
    fx.reports[3].write_text("")
    out = tmp_path / "run"
    assert main(["train", "--config", "configs/mimic_cxr.yaml", "--out", str(out), f"data.root={fx.root}",
                 f"cache_dir={tmp_path / 'c'}", "data.on_bad_record=skip", "data.multi_image=first",
                 "inference.objective=image_only", *TINY]) == 0
    log = capsys.readouterr().out
    assert ("mimic_cxr: 16 records; 1 left out (empty report); 1 left out (unreadable image (corrupt or truncated))"
            in log)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped"] == {"empty report": 1, "unreadable image (corrupt or truncated)": 1}


def test_chestxray14_bad_images_and_missing_label_rows(tmp_path):
    fx = build_chestxray14(tmp_path / "d", rows=16)
    truncate(fx.images[0], 0.3)  # a truncated PNG
    corrupt(fx.images[5])
    with open(fx.files["test"], "a") as f:  # a listed image without a label row
        f.write("00099999_000.png\n")
    with pytest.raises(DataError, match="00099999_000.png .*image without a label row in Data_Entry_2017_v2020.csv"):
        ChestXray14Dataset(str(fx.root), image_size=32, cache_dir=tmp_path / "c")
    ds = ChestXray14Dataset(str(fx.root), image_size=32, on_bad_record="skip", cache_dir=tmp_path / "c")
    assert ds.skipped == {"image without a label row in Data_Entry_2017_v2020.csv": 1,
                          "unreadable image (corrupt or truncated)": 2}
    assert len(ds) == fx.records - 2 and sum(len(v) for v in ds.official_split.values()) == len(ds)
    assert fx.images[0].name not in set(ds.csv["record"]) and fx.images[5].name not in set(ds.csv["record"])


def test_openi_malformed_report_missing_image_and_missing_labels(tmp_path):
    fx = build_openi(tmp_path / "openi", numbers=tuple(range(1, 13)))
    xml = real_openi_xml()
    members = {f"ecgen-radiology/{n}.xml": xml[n] for n in range(1, 13) if n in xml}
    members["ecgen-radiology/2.xml"] = xml[2][: len(xml[2]) // 2]  # malformed (cut) XML
    members["ecgen-radiology/4.xml"] = xml[4].replace(b"<major>", b"<minor>").replace(b"</major>", b"</minor>")
    write_tgz(members, fx.files["reports"])
    os.remove(fx.images[-1])  # the frontal image of the last report
    with pytest.raises(DataError, match=r"2.xml: malformed report XML .*data.on_bad_record=skip"):
        OpenIDataset(str(fx.root), reports=str(fx.files["reports"]), image_size=32)
    ds = OpenIDataset(str(fx.root), reports=str(fx.files["reports"]), image_size=32, on_bad_record="skip")
    assert ds.skipped == {"malformed report XML": 1, "report without MeSH major terms (no labels)": 1,
                          "image file missing": 1}
    assert len(ds) == fx.records - 3 and not {"CXR2", "CXR4"} & set(ds.groups)


def test_images_are_validated_once_and_the_cache_keeps_the_bad_ones(tmp_path, monkeypatch):
    fx = build_chestxray14(tmp_path / "d", rows=10)
    corrupt(fx.images[3])
    first = ChestXray14Dataset(str(fx.root), image_size=32, on_bad_record="skip", cache_dir=tmp_path / "c")
    monkeypatch.setattr(image_cache, "decode_image", lambda *a: pytest.fail("decoded again despite the cache"))
    again = ChestXray14Dataset(str(fx.root), image_size=32, on_bad_record="skip", cache_dir=tmp_path / "c")
    assert again.skipped == first.skipped == {"unreadable image (corrupt or truncated)": 1}
    assert np.array_equal(np.stack([again.images[i] for i in range(len(again))]),
                          np.stack([first.images[i] for i in range(len(first))]))
    with pytest.raises(DataError, match="unreadable image"):  # the error policy still sees the cached bad image
        ChestXray14Dataset(str(fx.root), image_size=32, cache_dir=tmp_path / "c")
