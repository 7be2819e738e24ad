"""The MeSH -> CheXpert mapping of `vkd_pyro.data.labels`, on the real OpenI archive and hand-made terms.

The archive tests pin the decisions down as literal figures (unmapped heads, per-class positive
counts, all-zero reports): a change to `MESH_RULES` that moves any report must show up here.
"""

import numpy as np
import pytest

from vkd_pyro.classes import CLASS_INDEX, CLASSES
from vkd_pyro.data import labels
from vkd_pyro.data.labels import (
    MESH_RULES,
    MeshRule,
    classes_of_term,
    findings_of,
    label_vector,
    unmapped_heads,
)
from vkd_pyro.data.openi_reports import MeshTerm, read_reports


def T(text: str) -> MeshTerm:
    """A MeSH term from its `Head/qualifier/...` text, as the report parser makes it."""
    return MeshTerm.parse(text)


def nonzero(vec: np.ndarray) -> set[str]:
    """The class names a label vector marks 1."""
    return {CLASSES[i] for i in np.flatnonzero(vec)}


@pytest.fixture(scope="module")
def reports():
    """All 3,955 reports of the real OpenI archive, parsed once for this module."""
    return read_reports()


@pytest.fixture(scope="module")
def vectors(reports):
    """The label vectors of all reports, (3955, 14)."""
    return np.stack([label_vector(r.major) for r in reports])


# -- the archive --------------------------------------------------------------------------------

def test_unmapped_heads_seen_at_least_20_times(reports):
    """The frequent heads that name no class anywhere: the deliberate non-mappings, by name."""
    assert set(unmapped_heads(reports, 20)) == {
        "Calcinosis", "Thoracic Vertebrae", "Spine", "Aorta", "Diaphragm", "Atherosclerosis",
        "Deformity", "Scoliosis", "Granulomatous Disease", "Aorta, Thoracic", "No Indexing",
        "Technical Quality of Image Unsatisfactory", "Costophrenic Angle", "Osteophyte",
        "Spondylosis", "Emphysema", "Pulmonary Disease, Chronic Obstructive", "Hernia, Hiatal",
        "Pulmonary Emphysema", "Kyphosis", "Arthritis", "Foreign Bodies",
        "Diaphragmatic Eventration", "Bone Diseases, Metabolic", "Lucency",
        "Calcified Granuloma", "Granuloma",  # CheXpert: no Lung Lesion (drawn, not labelled)
    }


def test_unmapped_heads_counts_and_threshold(reports):
    """unmapped_heads counts every occurrence (case merged) and drops heads under min_count."""
    at_10 = unmapped_heads(reports, 10)
    assert at_10["Calcinosis"] == 347
    assert at_10["Thoracic Vertebrae"] == 259  # 258 + one "Thoracic vertebrae"
    assert at_10["Sclerosis"] == 11
    assert "Sclerosis" not in unmapped_heads(reports, 20)
    assert "Lung" not in at_10  # mapped in some occurrences (Lung/interstitial)
    assert all(n >= 10 for n in at_10.values())


def test_every_frequent_head_has_a_rule(reports):
    """Each head seen >= 10 times is decided in MESH_RULES: some row applies to its terms."""
    counts = {}
    for report in reports:
        for term in report.major:
            counts.setdefault(labels._key(term.head), []).append(term)
    undecided = sorted(
        terms[0].head for terms in counts.values()
        if len(terms) >= 10 and all(labels.rule_of_term(t) is None for t in terms)
    )
    assert undecided == []


def test_per_class_positive_counts(vectors):
    """Reports with each class positive, and reports with all 14 labels 0."""
    counts = {name: int(vectors[:, i].sum()) for i, name in enumerate(CLASSES)}
    assert counts == {
        "No Finding": 1684,
        "Enlarged Cardiomediastinum": 35,
        "Cardiomegaly": 350,  # 401 before borderline went to uncertain
        "Lung Opacity": 777,
        "Lung Lesion": 128,  # 425 before granulomas left Lung Lesion (CheXpert)
        "Edema": 101,
        "Consolidation": 30,
        "Pneumonia": 42,
        "Atelectasis": 332,
        "Pneumothorax": 27,
        "Pleural Effusion": 162,  # one Pleural Effusion/borderline
        "Pleural Other": 81,
        "Fracture": 84,
        "Support Devices": 402,
    }
    assert int((vectors.sum(axis=1) == 0).sum()) == 897  # 674 before


def test_every_class_has_positives(vectors):
    """Every class has at least 20 positive reports, so each can be trained and scored."""
    counts = vectors.sum(axis=0)
    assert {CLASSES[i] for i in np.flatnonzero(counts < 20)} == set()


def test_no_finding_is_exclusive_with_pathology(vectors):
    """No report is both No Finding and positive for one of the 12 pathology classes."""
    pathology = [CLASS_INDEX[c] for c in labels.PATHOLOGY_CLASSES]
    assert len(pathology) == 12
    both = (vectors[:, CLASS_INDEX["No Finding"]] == 1) & (vectors[:, pathology].sum(axis=1) > 0)
    assert int(both.sum()) == 0


def test_normal_reports_are_no_finding(reports, vectors):
    """All 1,391 reports indexed "normal" get exactly No Finding."""
    normal = [i for i, r in enumerate(reports) if any(t.head == "normal" for t in r.major)]
    assert len(normal) == 1391
    assert all(nonzero(vectors[i]) == {"No Finding"} for i in normal)


# -- qualifier-dependent rules ------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Thickening/pleura/apex/bilateral", ("Pleural Other",)),
    ("Thickening/bronchi", ()),
    ("Thickening/lung/lower lobe/bronchi/bilateral", ()),
    ("Thickening/bronchovascular", ()),
    ("Thickening/lung/base/bilateral/interstitial", ("Lung Opacity",)),
    ("Lung/hypoinflation/mild", ()),
    ("Lung/hyperdistention", ()),
    ("Lung/interstitial/prominent", ("Lung Opacity",)),
    ("Markings/lung/interstitial/chronic", ("Lung Opacity",)),
    ("Markings/bronchovascular", ()),
    ("Mediastinum/prominent", ("Enlarged Cardiomediastinum",)),
    ("Mediastinum/right/paratracheal/prominent", ("Enlarged Cardiomediastinum",)),  # any position
    ("Mediastinum/right", ()),
    ("Cardiac Shadow/enlarged/mild", ("Cardiomegaly",)),
    ("Cardiac Shadow/obscured", ()),
    ("Cicatrix/lung/base/left", ("Lung Opacity",)),
    ("Cicatrix/pleura/right", ("Pleural Other",)),
    ("Opacity/lung/base/left", ("Lung Opacity",)),
    ("Opacity/retrocardiac", ("Lung Opacity",)),
    ("Opacity/ribs/left", ()),
    ("Density/lung/lingula", ("Lung Opacity",)),
    ("Density/thorax/round", ()),
    ("Mass/lung/upper lobe/right", ("Lung Lesion",)),
    ("Mass/breast/large", ()),
    ("Granuloma/ribs/right/posterior", ()),
    ("Calcified Granuloma/lung/upper lobe/left", ()),  # CheXpert: no lesion
    ("Pleura/blunted/mild", ()),
    ("Pleura/base/bilateral/abnormal/chronic", ("Pleural Other",)),
])
def test_qualifier_rules(text, expected):
    """Heads whose class depends on a qualifier map by it; others of the same head map to nothing."""
    assert classes_of_term(T(text)) == expected


@pytest.mark.parametrize("text, expected", [
    ("Opacity", ("Lung Opacity",)),
    ("Airspace Disease/lung/base", ("Lung Opacity",)),
    ("Infiltrate/lung", ("Lung Opacity",)),
    ("Nodule/lung", ("Lung Lesion",)),
    ("Calcified Granuloma", ()),
    ("Pulmonary Edema/interstitial", ("Edema",)),
    ("Pulmonary Congestion/mild", ("Edema",)),
    ("Catheters, Indwelling/right", ("Support Devices",)),
    ("Implanted Medical Device/left", ("Support Devices",)),
    ("Surgical Instruments/mediastinum", ("Support Devices",)),
    ("Tube, Inserted/trachea", ("Support Devices",)),
    ("Stents/coronary vessels", ("Support Devices",)),
    ("Fractures, Bone/ribs/left/healed", ("Fracture",)),
    ("Cardiomegaly/borderline", ("Cardiomegaly",)),
    ("Pulmonary Atelectasis/base/left", ("Atelectasis",)),
    ("Pleural Effusion/bilateral/small", ("Pleural Effusion",)),
    ("Pneumothorax/apex/right", ("Pneumothorax",)),
    ("Pneumonia/lower lobe/right", ("Pneumonia",)),
    ("Consolidation/lung/lower lobe/left", ("Consolidation",)),
    ("Hydropneumothorax/right", ("Pneumothorax", "Pleural Effusion")),
    ("normal", ("No Finding",)),
    ("Scoliosis/thoracic vertebrae", ()),
    ("Not A MeSH Head", ()),
])
def test_unconditional_rules(text, expected):
    """The issue's examples and the plain heads map to their class whatever the qualifiers."""
    assert classes_of_term(T(text)) == expected


def test_head_lookup_ignores_case_commas_and_spacing():
    """Heads and qualifiers match without regard to case; commas and repeated spaces are ignored."""
    assert classes_of_term(MeshTerm("CARDIOMEGALY")) == ("Cardiomegaly",)
    assert classes_of_term(MeshTerm("pulmonary atelectasis")) == ("Atelectasis",)
    assert classes_of_term(MeshTerm("catheters, indwelling")) == ("Support Devices",)
    assert classes_of_term(MeshTerm("Catheters Indwelling")) == ("Support Devices",)
    assert classes_of_term(MeshTerm("Fractures,  Bone")) == ("Fracture",)
    assert classes_of_term(MeshTerm("NORMAL")) == ("No Finding",)
    assert classes_of_term(MeshTerm("THICKENING", ("Pleura",))) == ("Pleural Other",)
    assert classes_of_term(MeshTerm("thickening", ("BRONCHI",))) == ()


# -- No Finding ---------------------------------------------------------------------------------

def test_label_vector_shape_and_values():
    """label_vector is float32 (14,), in CLASSES order, with a 1 for each class named."""
    vec = label_vector([T("Cardiomegaly/mild"), T("Pleural Effusion/left"), T("Opacity/lung/base/left")])
    assert vec.dtype == np.float32 and vec.shape == (14,)
    assert nonzero(vec) == {"Cardiomegaly", "Pleural Effusion", "Lung Opacity"}
    assert set(np.unique(vec)) <= {0.0, 1.0}


@pytest.mark.parametrize("texts, expected", [
    (["normal"], {"No Finding"}),
    (["No Indexing"], {"No Finding"}),
    (["Technical Quality of Image Unsatisfactory"], {"No Finding"}),
    (["Lung/hypoinflation"], {"No Finding"}),  # low lung volumes: no abnormality
    (["Aorta/tortuous/mild"], {"No Finding"}),
    ([], {"No Finding"}),
    # support devices alone do not rule out No Finding (CheXpert's rule)
    (["Catheters, Indwelling/right"], {"No Finding", "Support Devices"}),
    (["Implanted Medical Device/left", "Surgical Instruments"], {"No Finding", "Support Devices"}),
    # any pathology does
    (["Catheters, Indwelling/right", "Pleural Effusion/right"], {"Support Devices", "Pleural Effusion"}),
    (["Cardiomegaly/borderline"], set()),  # uncertain -> 0, and no longer No Finding
    (["Thickening/pleura/apex/bilateral"], {"Pleural Other"}),
    # so does a finding outside the 14 classes: all labels 0
    (["Scoliosis/thoracic vertebrae/mild"], set()),
    (["Lung/hyperdistention", "Emphysema"], set()),
    (["Thickening/bronchi"], set()),
    (["Not A MeSH Head"], set()),
    (["Catheters, Indwelling", "Calcinosis/aorta"], {"Support Devices"}),
    (["Aorta/enlarged"], set()),
])
def test_no_finding_rule(texts, expected):
    """No Finding is 1 unless a term reports an abnormality other than a support device."""
    assert nonzero(label_vector([T(t) for t in texts])) == expected


# -- findings_of --------------------------------------------------------------------------------

def test_findings_of_keeps_terms_and_order():
    """findings_of pairs each class with the very term (qualifiers and all), in term order."""
    terms = [T("Opacity/lung/base/left"), T("Scoliosis"), T("Catheters, Indwelling/right"),
             T("Hydropneumothorax/apex/right"), T("Thickening/pleura/apex/left")]
    found = findings_of(terms)
    assert [name for name, _ in found] == [
        "Lung Opacity", "Support Devices", "Pneumothorax", "Pleural Effusion", "Pleural Other"]
    assert found[0][1] is terms[0]
    assert found[0][1].qualifiers == ("lung", "base", "left")
    assert found[2][1] is terms[3] and found[3][1] is terms[3]
    assert found[4][1].qualifiers == ("pleura", "apex", "left")


def test_findings_of_leaves_out_no_finding():
    """A normal report has no findings; No Finding never appears in findings_of."""
    assert findings_of([T("normal")]) == []
    assert findings_of([T("No Indexing")]) == []
    assert findings_of([T("normal"), T("Nodule/lung/lingula")]) == [("Lung Lesion", T("Nodule/lung/lingula"))]


def test_findings_of_agrees_with_label_vector(reports):
    """On the archive, findings_of draws the positives, the borderline (uncertain) classes and the
    granulomas (as Lung Lesion), and nothing else."""
    for report in reports:
        vec = label_vector(report.major)
        drawn = {name for name, _ in findings_of(report.major)}
        uncertain = {CLASSES[i] for i in np.flatnonzero(labels.uncertain_classes(report.major))}
        granuloma = any("granuloma" in t.head.lower() and labels.drawn_classes_of_term(t) for t in report.major)
        assert nonzero(vec) - {"No Finding"} <= drawn
        assert drawn <= nonzero(vec) | uncertain | ({"Lung Lesion"} if granuloma else set())


# -- the table itself ---------------------------------------------------------------------------

def test_table_names_only_known_classes():
    """Every class in MESH_RULES is one of the 14, and every class but No Finding is reachable."""
    named = {c for rule in MESH_RULES for c in rule.classes}
    assert named <= set(CLASSES)
    assert named == set(CLASSES)


def test_table_checks_reject_bad_rows():
    """The import-time checks refuse unknown classes, dead rows and class-naming non-findings."""
    with pytest.raises(ValueError, match="unknown class"):
        labels._compile([MeshRule("Opacity", None, ("Lung Opacities",))])
    with pytest.raises(ValueError, match="catch-all"):
        labels._compile([MeshRule("Thickening", None, ()),
                         MeshRule("thickening", "pleura", ("Pleural Other",))])
    with pytest.raises(ValueError, match="finding=False"):
        labels._compile([MeshRule("normal", None, ("No Finding",), finding=False)])


# -- uncertainty and data.label_policy ----------------------------------------------------------

def test_granulomas_are_drawn_but_not_labelled():
    """A calcified granuloma is no Lung Lesion and no No Finding, but the phantom draws it."""
    term = T("Calcified Granuloma/lung/upper lobe/left")
    assert nonzero(label_vector([term])) == set()
    assert findings_of([term]) == [("Lung Lesion", term)]
    assert findings_of([T("Calcified Granuloma/mediastinum")]) == []


@pytest.mark.parametrize("sentence, expected", [
    ("This may represent early pneumonia.", {"Pneumonia"}),
    ("Possible small right pleural effusion.", {"Pleural Effusion"}),
    ("Left basilar atelectasis versus consolidation.", {"Atelectasis", "Consolidation"}),
    ("Cardiomegaly versus pericardial effusion.", {"Cardiomegaly"}),  # pericardial: no pleural effusion
    ("No focal airspace opacity to suggest pneumonia.", set()),  # a negation, not a hedge
    ("Right lower lobe pneumonia.", set()),  # asserted, not hedged
    ("Nodule may be a calcified granuloma.", set()),  # CheXpert: no lesion
    ("Left upper lobe opacity, cannot exclude mass.", {"Lung Opacity", "Lung Lesion"}),
])
def test_hedged_mentions(sentence, expected):
    assert {CLASSES[i] for i in np.flatnonzero(labels.hedged_mentions(sentence))} == expected


def test_report_labels_policies():
    """Uncertain -> 0, 1 or masked; a term's assertion wins over a hedge; No Finding never uncertain."""
    terms = [T("Cardiomegaly/borderline"), T("Pulmonary Atelectasis/base/left")]
    text = "Borderline cardiomegaly. Left basilar atelectasis. This may represent pneumonia."
    cm, at, pn, nf = (CLASS_INDEX[c] for c in ("Cardiomegaly", "Atelectasis", "Pneumonia", "No Finding"))
    zeros, known_z = labels.report_labels(terms, text, "zeros")
    ones, known_o = labels.report_labels(terms, text, "ones")
    ignore, known_i = labels.report_labels(terms, text, "ignore")
    assert (zeros[cm], zeros[at], zeros[pn], zeros[nf]) == (0, 1, 0, 0)
    assert (ones[cm], ones[at], ones[pn], ones[nf]) == (1, 1, 1, 0)
    assert np.array_equal(ignore, zeros) and known_z.all() and known_o.all()
    assert {CLASSES[i] for i in np.flatnonzero(known_i == 0)} == {"Cardiomegaly", "Pneumonia"}
    # a hedge alone rules out No Finding (CheXpert's aggregation); without text the terms decide
    assert labels.report_labels([T("normal")], "Possible pneumonia.")[0][nf] == 0
    assert labels.report_labels([T("normal")])[0][nf] == 1
    with pytest.raises(ValueError, match="label policy"):
        labels.report_labels(terms, text, "maybe")


def test_policy_counts_on_the_archive(reports):
    """Positives per class under each policy (FINDINGS + IMPRESSION text), as docs/labels.md."""
    out = {}
    for policy in labels.LABEL_POLICIES:
        got = [labels.report_labels(r.major, r.text(), policy) for r in reports]
        out[policy] = (np.stack([g[0] for g in got]), np.stack([g[1] for g in got]))
    zeros, ones, (ignore, known) = out["zeros"][0], out["ones"][0], out["ignore"]
    col = {c: CLASS_INDEX[c] for c in CLASSES}
    assert int(zeros[:, col["No Finding"]].sum()) == 1674
    assert int(zeros[:, col["Pneumonia"]].sum()) == 42 and int(ones[:, col["Pneumonia"]].sum()) == 111
    assert int(ones[:, col["Cardiomegaly"]].sum()) == 401 and int(ones[:, col["Lung Lesion"]].sum()) == 165
    assert int((known == 0).sum()) == int((ones != zeros).sum()) == 308
    assert np.array_equal(ignore, zeros)
