"""CheXpert labels for OpenI reports, read off their `MeSH/major` terms.

OpenI reports carry no CheXpert labels; their indexers wrote `MeSH/major` terms instead
(`Opacity/lung/base/left`, `Cardiomegaly/mild`, `normal`, ...). `MESH_RULES` is the one table that
says which of the 14 CheXpert classes (`vkd_pyro.classes.CLASSES`) each term names; the functions
below only read it:

- `classes_of_term(term)`: the classes one term names (usually 0 or 1);
- `findings_of(terms)`: (class, term) for each finding the phantom renderer draws;
- `label_vector(terms)`: the 14-long 0/1 vector of a report from its terms, uncertain -> 0;
- `report_labels(terms, text, policy)`: labels and label mask with uncertain mentions under
  `data.label_policy` (zeros | ones | ignore), as MIMIC-CXR's -1 labels;
- `unmapped_heads(reports, min_count)`: the frequent heads that name no class anywhere.

Where these rules part from CheXpert's mention definitions (decided for issue #9; the table of
counts is in docs/labels.md):

- Granulomas. CheXpert's Lung Lesion is a nodule or mass; its labeller un-mentions "calcified
  nodule" and lists "granuloma" as an incidental finding. Granuloma and Calcified Granuloma (2/3 of
  the old Lung Lesion positives, 425 -> 128 reports) are therefore no class: they still rule out
  No Finding and the phantom still draws them (small bright nodules, `MeshRule.drawn_as`), now as
  unlabelled distractors, as on a real film.
- Uncertainty. The indexers index what the radiologist asserts: a hedged mention ("may represent
  pneumonia") usually gets no term and so was a 0, while `Cardiomegaly/borderline` was a 1. Both
  are now *uncertain*, as CheXpert's -1: a `borderline` term, and a class mentioned in a hedged
  sentence of the text that no term names (`hedged_mentions`, a phrase-level approximation of the
  labeller's uncertainty patterns). `data.label_policy` sends them to 0, 1, or unknown (masked).
  CheXpert's aggregation: No Finding is 0 when a pathology is uncertain.
- Support devices come from the terms only: sternotomy wires count when the indexers added
  `Surgical Instruments` or `Sutures` (107 report texts say "sternotomy"; 54 of them have no
  Support Devices term and are 0). No text rule is added: "sternotomy" names the operation, and
  the wires are not always said to be there.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Iterable, NamedTuple, Optional, Sequence

import numpy as np

from vkd_pyro.classes import CLASS_INDEX, CLASSES, NUM_CLASSES
from vkd_pyro.data.openi_reports import MeshTerm, Report

NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"
#: The classes that rule out No Finding: all but No Finding itself and Support Devices.
PATHOLOGY_CLASSES: tuple[str, ...] = tuple(c for c in CLASSES if c not in (NO_FINDING, SUPPORT_DEVICES))


class MeshRule(NamedTuple):
    """One row of `MESH_RULES`.

    head: the MeSH head, matched without regard to case, commas or repeated spaces.
    qualifier: None (any term with this head), a qualifier, or a tuple of alternatives; the rule
        applies when the term carries that qualifier (any of them) at any position.
    classes: the CheXpert classes the term names; () for a finding outside the 14 classes.
    finding: False only for the few class-less terms that report no abnormality at all (see
        `label_vector`); they leave No Finding alone, every other class-less term rules it out.
    drawn_as: None (the term is drawn as its `classes`) or the classes whose look the phantom
        renderer gives a term that is labelled otherwise: calcified granulomas are no CheXpert
        class but are drawn as the small bright nodules they are on a film (`findings_of`).
    """

    head: str
    qualifier: str | tuple[str, ...] | None
    classes: tuple[str, ...]
    finding: bool = True
    drawn_as: tuple[str, ...] | None = None


_NF = ("No Finding",)
_ECM = ("Enlarged Cardiomediastinum",)
_CM = ("Cardiomegaly",)
_LO = ("Lung Opacity",)
_LL = ("Lung Lesion",)
_ED = ("Edema",)
_PE = ("Pleural Effusion",)
_PX = ("Pneumothorax",)
_PO = ("Pleural Other",)
_SD = ("Support Devices",)
_NONE: tuple[str, ...] = ()

# How this table was decided. All 3,955 reports of the real archive (torchxrayvision's
# NLMCXR_reports.tgz, `read_reports()`) were counted: 8,298 major terms, 119 distinct heads as
# matched (122 spellings), 68 of them seen >= 10 times. Every head seen >= 10 times has a row,
# mapped or deliberately not; ambiguous heads have rows by qualifier, decided from the head +
# qualifier counts and a look at report texts ("n" below = number of terms). Rarer heads have a
# row when they clearly are a CheXpert class or clearly report no abnormality; any other head
# names no class and counts as a finding (111 terms of 36 rare heads, e.g. Bronchiectasis).
#
# The yardstick is the CheXpert labeller (stanfordmlgroup/chexpert-labeler, phrases/mention/*.txt
# and mention_phrases/airspace_opacity.txt), which made the MIMIC-CXR labels the paper follows: a
# term goes to the class whose mention phrases its report wording would hit ("scar" -> Lung
# Opacity, "interstitial marking" -> Lung Opacity, "fibrosis" -> Pleural Other, "heart failure" ->
# Edema, "cardiac shadow" -> Cardiomegaly). Granuloma and Calcified Granuloma follow the labeller
# too (issue #9; they used to be Lung Lesion): its Lung Lesion phrases ("mass", "nodule", ...) do
# not name granulomas, it un-mentions "calcified nodule", and it lists "granuloma" among the
# incidental findings that only rule out No Finding. They made 2/3 of the old Lung Lesion
# positives, so the old class mostly measured "calcified granuloma seen". They stay findings
# (No Finding 0) and are still drawn (`drawn_as`), so the phantoms keep them as distractors.
#
# Resulting report counts from the terms alone (`label_vector`, borderline -> 0; docs/labels.md has
# the table with the old counts and the hedged text mentions of `report_labels` per policy):
# No Finding 1684, Enlarged Cardiomediastinum 35, Cardiomegaly 350, Lung Opacity 777, Lung Lesion
# 128, Edema 101, Consolidation 30, Pneumonia 42, Atelectasis 332, Pneumothorax 27, Pleural
# Effusion 162, Pleural Other 81, Fracture 84, Support Devices 402; 897 reports with all labels 0.
#
# Matching: the rows of one head are tried top to bottom; the first whose qualifier is None or is
# carried by the term (at any position) decides. A row after its head's catch-all row (qualifier
# None) could never apply: the module refuses such a table at import.
MESH_RULES: tuple[MeshRule, ...] = (
    # -- No Finding, and terms that report nothing abnormal --------------------------------------
    MeshRule("normal", None, _NF),  # n=1391, always the report's only term
    MeshRule("No Indexing", None, _NONE, finding=False),  # n=95, always alone; texts read normal
    # n=86: the image, not the patient (6 reports have it alone; their texts read normal)
    MeshRule("Technical Quality of Image Unsatisfactory", None, _NONE, finding=False),
    MeshRule("Nipple Shadow", None, _NONE, finding=False),  # n=7: normal soft tissue
    MeshRule("Epicardial Fat", None, _NONE, finding=False),  # n=16: prominent fat pad, normal variant
    MeshRule("Breast Implants", None, _NONE, finding=False),  # n=5
    MeshRule("Mastectomy", None, _NONE, finding=False),  # n=6
    MeshRule("Contrast Media", None, _NONE, finding=False),  # n=4: contrast in bowel/oesophagus
    # -- Lung Opacity ------------------------------------------------------------------------------
    # Opacity n=536: lung 472, retrocardiac 11, costophrenic angle 7, thorax 6 (texts: lung), ribs 6,
    # mediastinum 5 (mediastinal masses, an artefact), none/laterality/shape ~20; 15 excluded.
    MeshRule("Opacity", "lung", _LO),
    MeshRule("Opacity", ("ribs", "thoracic vertebrae", "adipose tissue", "mediastinum", "supracardiac", "heart"),
             _NONE),
    MeshRule("Opacity", None, _LO),
    MeshRule("Airspace Disease", None, _LO),  # n=132, all /lung
    MeshRule("Infiltrate", None, _LO),  # n=68, all /lung
    # Density n=131: lung 77, thorax 15 (texts: hiatal hernia, breast mass, granulomas), ribs 7,
    # costophrenic angle 6, mediastinum 4, retrocardiac 4, heart 2, bones/soft tissue ~8.
    MeshRule("Density", "lung", _LO),
    MeshRule("Density", ("thorax", "ribs", "mediastinum", "heart", "paratracheal", "sternum", "clavicle", "breast",
                         "adipose tissue", "mitral valve"), _NONE),
    MeshRule("Density", None, _LO),
    # Cicatrix (scar) n=210: lung 176 ("scarring": labeller's Lung Opacity phrase "scar"),
    # pleura 18 and costophrenic angle 4 ("pleural scar": Pleural Other), ribs 1, breast 1.
    MeshRule("Cicatrix", ("pleura", "costophrenic angle"), _PO),
    MeshRule("Cicatrix", ("ribs", "breast"), _NONE),
    MeshRule("Cicatrix", None, _LO),
    # Markings n=171: interstitial 66 ("interstitial markings": Lung Opacity);
    # bronchovascular 77 and unqualified lung markings: no class.
    MeshRule("Markings", "interstitial", _LO),
    MeshRule("Markings", None, _NONE),
    # Lung n=568: hypoinflation 284 (low lung volumes: inspiration, no abnormality, no labeller
    # phrase), hyperdistention 208 (labeller "other finding": "hyperinflat"), hilum 28
    # (prominent/enlarged hila), interstitial 13 (prominent interstitium: Lung Opacity),
    # azygos lobe 8 (normal variant), blood vessels 3, apex/obscured 4: no other CheXpert class.
    MeshRule("Lung", "interstitial", _LO),
    MeshRule("Lung", ("hypoinflation", "azygos lobe"), _NONE, finding=False),
    MeshRule("Lung", None, _NONE),
    MeshRule("Lung Diseases, Interstitial", None, _LO),  # n=14: "interstitial lung disease"
    # -- Lung Lesion -------------------------------------------------------------------------------
    MeshRule("Nodule", None, _LL),  # n=121: lung 109, thorax 4, pleura 3
    MeshRule("Mass", ("breast", "mediastinum", "paratracheal"), _NONE),  # n=3: not a lung lesion
    MeshRule("Mass", None, _LL),  # n=15: lung 12, thorax 3
    # Calcified Granuloma n=284: lung 207, no site/scattered/multiple ~65; mediastinum 3,
    # paratracheal 2: calcified nodes, not a lung lesion.
    # CheXpert: no Lung Lesion (see above); drawn as the small calcified nodules they are.
    MeshRule("Calcified Granuloma", ("mediastinum", "paratracheal"), _NONE),
    MeshRule("Calcified Granuloma", None, _NONE, drawn_as=_LL),
    MeshRule("Granuloma", ("ribs", "thoracic vertebrae"), _NONE),  # n=2: bone
    MeshRule("Granuloma", None, _NONE, drawn_as=_LL),  # n=51, lung 38
    MeshRule("Cavitation", None, _LL),  # n=6, all /lung: "cavitary lesion"
    MeshRule("Granulomatous Disease", None, _NONE),  # n=112: the diagnosis; its lesions are indexed apart
    MeshRule("Calcinosis", None, _NONE),  # n=347: aorta 95, hilar/mediastinal nodes ~110, lung ~30
    # -- Cardiomegaly / Enlarged Cardiomediastinum ------------------------------------------------
    MeshRule("Cardiomegaly", None, _CM),  # n=375; borderline 47: uncertain (`uncertain_classes`)
    # Cardiac Shadow n=58: enlarged 52, borderline 3, prominent 1 -> Cardiomegaly ("cardiac
    # shadow" is a labeller Cardiomegaly phrase); obscured 1, irregular 1 -> no class.
    MeshRule("Cardiac Shadow", ("enlarged", "borderline", "prominent"), _CM),
    MeshRule("Cardiac Shadow", None, _NONE),
    MeshRule("Heart Atria", ("enlarged", "prominent"), _CM),  # n=4
    MeshRule("Heart Ventricles", ("enlarged", "prominent"), _CM),  # n=3
    MeshRule("Heart", None, _NONE),  # n=10: obscured borders 8, small 1, apex prominent 1
    # Mediastinum n=27: all prominent 17 / enlarged (incl. nodes, paratracheal) 10.
    MeshRule("Mediastinum", ("prominent", "enlarged", "widened"), _ECM),
    MeshRule("Mediastinum", None, _NONE),
    MeshRule("Lymph Nodes", "paratracheal", _ECM),  # n=1 of 3: mediastinal adenopathy
    MeshRule("Lymph Nodes", None, _NONE),
    MeshRule("Pericardial Effusion", None, _ECM),  # n=7: enlarged cardiopericardial silhouette
    MeshRule("Shift", None, _NONE),  # n=10: mediastinal shift is displacement, not enlargement
    # Aorta n=167 and Aorta, Thoracic n=95: tortuous 159 + 92, an age change that no labeller
    # phrase names (no abnormality); prominent/enlarged 11: a finding, but no CheXpert class.
    MeshRule("Aorta", ("prominent", "enlarged"), _NONE),
    MeshRule("Aorta", "tortuous", _NONE, finding=False),
    MeshRule("Aorta", None, _NONE),
    MeshRule("Aorta, Thoracic", ("prominent", "enlarged"), _NONE),
    MeshRule("Aorta, Thoracic", "tortuous", _NONE, finding=False),
    MeshRule("Aorta, Thoracic", None, _NONE),
    MeshRule("Pulmonary Artery", None, _NONE),  # n=13: enlarged arteries, pulmonary hypertension
    # -- Edema -------------------------------------------------------------------------------------
    MeshRule("Pulmonary Edema", None, _ED),  # n=47
    MeshRule("Pulmonary Congestion", None, _ED),  # n=76: labeller phrase "pulmonary congestion"
    MeshRule("Heart Failure", None, _ED),  # n=11: labeller phrase "heart failure" (Edema)
    # -- Consolidation, Pneumonia, Atelectasis ----------------------------------------------------
    MeshRule("Consolidation", None, ("Consolidation",)),  # n=33
    MeshRule("Pneumonia", None, ("Pneumonia",)),  # n=43
    MeshRule("Pulmonary Atelectasis", None, ("Atelectasis",)),  # n=347
    MeshRule("Volume Loss", None, _NONE),  # n=10: a labeller "other finding", not atelectasis
    # -- Pneumothorax, Pleural Effusion, Pleural Other --------------------------------------------
    MeshRule("Pneumothorax", None, _PX),  # n=23
    MeshRule("Hydropneumothorax", None, _PX + _PE),  # n=4
    MeshRule("Hemopneumothorax", None, _PX + _PE),  # n=1: blood is pleural fluid
    MeshRule("Hemothorax", None, _PE),  # n=1
    MeshRule("Pleural Effusion", None, _PE),  # n=172
    # Thickening n=57: pleura 48 -> Pleural Other; interstitial 2 -> Lung Opacity; bronchi /
    # bronchovascular 5 (texts: "peribronchial cuffing", "bronchial thickening", no labeller
    # phrase), heart ventricles 1, right 1 -> no class.
    MeshRule("Thickening", "pleura", _PO),
    MeshRule("Thickening", "interstitial", _LO),
    MeshRule("Thickening", None, _NONE),
    MeshRule("Pulmonary Fibrosis", None, _PO),  # n=19: labeller puts "fibrosis" in Pleural Other
    MeshRule("Fibrosis", None, _PO),  # n=1
    MeshRule("Pleura", "blunted", _NONE),  # n=2: blunting, as Costophrenic Angle
    MeshRule("Pleura", None, _PO),  # n=1: abnormal chronic pleura
    # Costophrenic Angle n=81, blunted 72: effusion or pleural thickening/scar; the indexers add
    # Pleural Effusion / Thickening / Cicatrix when the text decides, so blunting alone is no class.
    MeshRule("Costophrenic Angle", None, _NONE),
    # -- Fracture ----------------------------------------------------------------------------------
    MeshRule("Fractures, Bone", None, ("Fracture",)),  # n=90: ribs 53, vertebrae 15, clavicle 10
    MeshRule("Deformity", None, _NONE),  # n=128: old deformities; fractures get their own term
    # -- Support Devices -----------------------------------------------------------------------
    MeshRule("Catheters, Indwelling", None, _SD),  # n=129
    MeshRule("Surgical Instruments", None, _SD),  # n=112: clips, sternotomy wires
    MeshRule("Implanted Medical Device", None, _SD),  # n=112: pacemakers, valves, prostheses
    MeshRule("Tube, Inserted", None, _SD),  # n=33
    MeshRule("Spinal Fusion", None, _SD),  # n=27: fusion hardware (labeller: "hardware", "screw")
    MeshRule("Medical Device", None, _SD),  # n=24
    MeshRule("Stents", None, _SD),  # n=19
    MeshRule("Sutures", None, _SD),  # n=7: suture lines/material, as Surgical Instruments
    # -- Seen >= 10 times, no CheXpert class (findings all the same: they rule out No Finding) ----
    MeshRule("Thoracic Vertebrae", None, _NONE),  # n=259: degenerative
    MeshRule("Spine", None, _NONE),  # n=182: degenerative
    MeshRule("Atherosclerosis", None, _NONE),  # n=132
    MeshRule("Diaphragm", None, _NONE),  # n=144: elevated 85, flattened 52
    MeshRule("Scoliosis", None, _NONE),  # n=124
    MeshRule("Osteophyte", None, _NONE),  # n=72
    MeshRule("Spondylosis", None, _NONE),  # n=63
    MeshRule("Emphysema", None, _NONE),  # n=62
    MeshRule("Pulmonary Disease, Chronic Obstructive", None, _NONE),  # n=50
    MeshRule("Hernia, Hiatal", None, _NONE),  # n=48
    MeshRule("Pulmonary Emphysema", None, _NONE),  # n=36
    MeshRule("Kyphosis", None, _NONE),  # n=35
    MeshRule("Arthritis", None, _NONE),  # n=34
    MeshRule("Foreign Bodies", None, _NONE),  # n=34: bullet fragments, piercings; not devices
    MeshRule("Diaphragmatic Eventration", None, _NONE),  # n=34
    MeshRule("Bone Diseases, Metabolic", None, _NONE),  # n=32: osteopenia
    MeshRule("Lucency", None, _NONE),  # n=26: lung 9, bones 11, other 6
    MeshRule("Lung, Hyperlucent", None, _NONE),  # n=18
    MeshRule("Shoulder", None, _NONE),  # n=16: degenerative
    MeshRule("Lumbar Vertebrae", None, _NONE),  # n=12: degenerative
    MeshRule("Sclerosis", None, _NONE),  # n=11: bone sclerosis
)


def _key(text: str) -> str:
    """A head or qualifier as matched: case-folded, commas dropped, spaces collapsed."""
    return " ".join(text.replace(",", " ").casefold().split())


def _compile(rules: Sequence[MeshRule]) -> dict[str, list[tuple[frozenset[str] | None, MeshRule]]]:
    """Group the rules by head key, checking the table's invariants."""
    by_head: dict[str, list[tuple[frozenset[str] | None, MeshRule]]] = defaultdict(list)
    for rule in rules:
        for name in rule.classes:
            if name not in CLASS_INDEX:
                raise ValueError(f"MESH_RULES: {rule.head!r} names unknown class {name!r}")
        if not rule.finding and rule.classes:
            raise ValueError(f"MESH_RULES: {rule.head!r} names classes but is marked finding=False")
        entries = by_head[_key(rule.head)]
        if entries and entries[-1][0] is None:
            raise ValueError(f"MESH_RULES: rule {rule} comes after the catch-all rule of its head")
        if rule.qualifier is None:
            quals = None
        else:
            alternatives = (rule.qualifier,) if isinstance(rule.qualifier, str) else rule.qualifier
            quals = frozenset(_key(q) for q in alternatives)
        entries.append((quals, rule))
    return dict(by_head)


_RULES_BY_HEAD = _compile(MESH_RULES)


def rule_of_term(term: MeshTerm) -> MeshRule | None:
    """The row of `MESH_RULES` that decides `term`, or None when no row applies to it."""
    entries = _RULES_BY_HEAD.get(_key(term.head))
    if not entries:
        return None
    quals = {_key(q) for q in term.qualifiers}
    for required, rule in entries:
        if required is None or required & quals:
            return rule
    return None


def classes_of_term(term: MeshTerm) -> tuple[str, ...]:
    """The CheXpert classes one MeSH term names, in table order; () for none (or no rule)."""
    rule = rule_of_term(term)
    return rule.classes if rule is not None else ()


def _rules_out_no_finding(term: MeshTerm) -> bool:
    """Whether a term reports an abnormality other than a support device (see `label_vector`)."""
    rule = rule_of_term(term)
    if rule is None:
        return True
    if rule.classes:
        return any(c in PATHOLOGY_CLASSES for c in rule.classes)
    return rule.finding


def drawn_classes_of_term(term: MeshTerm) -> tuple[str, ...]:
    """The classes whose look the phantom renderer gives `term`: its rule's `drawn_as`, else its classes."""
    rule = rule_of_term(term)
    if rule is None:
        return ()
    return rule.drawn_as if rule.drawn_as is not None else rule.classes


def findings_of(terms: Sequence[MeshTerm]) -> list[tuple[str, MeshTerm]]:
    """(class name, term) for each finding the phantom shows, in term order; No Finding left out.

    These are what the renderer draws, not the labels: each class a term names, plus the look of
    terms drawn but not labelled (`MeshRule.drawn_as`: calcified granulomas as small bright
    nodules), and uncertain ones too (a borderline heart is drawn borderline). Support Devices are
    included; the term keeps its qualifiers, which say where the finding is (`Opacity/lung/base/left`).
    """
    return [(name, term) for term in terms for name in drawn_classes_of_term(term) if name != NO_FINDING]


def label_vector(terms: Sequence[MeshTerm]) -> np.ndarray:
    """The report's labels from its terms alone, float32 (14,) in `CLASSES` order, uncertain -> 0:
    1 for each class a term names, except the classes only `borderline` terms name (uncertain, see
    `uncertain_classes`), which are 0; `report_labels` adds the hedged text mentions and the policy.

    No Finding follows the CheXpert labeller's aggregation: it is 1 unless some term reports an
    abnormality other than a support device. An abnormality is a term naming any of the 12
    pathology classes, or a term naming no class that is a finding all the same (scoliosis,
    emphysema, degenerative spine, ...): CheXpert's labeller lists such findings as "No Finding"
    mention phrases (phrases/mention/no_finding.txt: "emphysema", "scoliosis", "degenera",
    "calcifi", "granuloma", "hernia", "deformity", ...) and any positive one of them sets No Finding
    to 0 (stages/aggregate.py). Terms marked `finding=False` (No Indexing, image quality, normal
    variants) and terms that name only Support Devices leave it at 1; so does an empty list.

    On the 3,955 OpenI reports this gives No Finding = 1 for 1,684 reports (1,391 "normal",
    95 "No Indexing", 198 whose terms are only support devices, low lung volumes, a tortuous aorta,
    image quality or normal variants) and 674 reports with all 14 labels 0: they report only
    findings outside the 14 classes (degenerative spine, calcified nodes, emphysema, scoliosis,
    hyperinflation, ...). The CheXpert labeller yields such rows too: of the 28,480 CheXpert
    training rows (chexpert_train.csv.gz) with no positive or uncertain pathology, 6,099 have No
    Finding blank. Setting No Finding from the 12 pathology classes alone would give 2,427 No
    Finding and no all-zero report, calling those 674 abnormal reports normal, which neither the
    OpenI indexers (who wrote no "normal" for them) nor the CheXpert labeller do.
    """
    return report_labels(terms)[0]


def _positive_and_borderline(terms: Sequence[MeshTerm]) -> tuple[np.ndarray, np.ndarray, bool]:
    """(positive (14,) bool, borderline-only (14,) bool, abnormal) of a report's terms."""
    positive = np.zeros(NUM_CLASSES, dtype=bool)
    borderline = np.zeros(NUM_CLASSES, dtype=bool)
    abnormal = False
    for term in terms:
        hedged = HEDGE_QUALIFIER in term.qualifiers
        for name in classes_of_term(term):
            if name != NO_FINDING:
                (borderline if hedged else positive)[CLASS_INDEX[name]] = True
        abnormal = abnormal or _rules_out_no_finding(term)
    return positive, borderline & ~positive, abnormal


#: The qualifier that makes a term uncertain (n=54 on the archive, 47 of them Cardiomegaly).
HEDGE_QUALIFIER = "borderline"

# Hedged text mentions. A sentence of FINDINGS + IMPRESSION is hedged when it has one of the
# uncertainty cues (a subset of the CheXpert labeller's patterns/pre_negation_uncertainty.txt and
# post_negation_uncertainty.txt, as plain phrases) and no negation cue ("no", "without",
# "negative for", "to suggest": "no opacity to suggest pneumonia" is a negation, not a hedge).
# A class it mentions (a subset of the labeller's phrases/mention/*.txt) is uncertain unless a
# term already names it: the indexers index what the radiologist asserts.
_UNCERTAIN_CUES = re.compile(
    r"\b(possible|possibly|probable|probably|may|might|could|cannot be excluded|can not be excluded|"
    r"cannot exclude|not excluded|questionable|question|suspicious for|concerning for|suggestive of|"
    r"suggests?|versus|vs|likely|equivocal|borderline|differential|difficult to exclude)\b", re.I)
_NEGATION_CUES = re.compile(r"\b(no|without|negative for|to suggest|resolved|free of|clear of)\b", re.I)
MENTION_PHRASES: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": ("mediastinal widening", "widened mediastinum", "widening of the mediastinum",
                                   "mediastinal enlargement", "enlarged mediastinum"),
    "Cardiomegaly": ("cardiomegaly", "enlarged heart", "cardiac enlargement", "heart size is enlarged",
                     "enlarged cardiac silhouette", "enlargement of the cardiac silhouette"),
    "Lung Opacity": ("opacit", "infiltrat", "airspace disease", "air space disease", "airspace process",
                     "scarring", "interstitial marking"),
    "Lung Lesion": ("nodule", "nodular", "mass", "neoplasm", "tumor", "carcinoma", "malignan", "lung cancer"),
    "Edema": ("edema", "vascular congestion", "pulmonary congestion", "heart failure", "chf"),
    "Consolidation": ("consolidat",),
    "Pneumonia": ("pneumonia", "infection", "infectious process", "aspiration"),
    "Atelectasis": ("atelecta", "collapse"),
    "Pneumothorax": ("pneumothora",),
    "Pleural Effusion": ("effusion", "pleural fluid"),
    "Pleural Other": ("pleural thickening", "fibrosis", "pleural scar"),
    "Fracture": ("fracture",),
}
_MENTIONS = {name: re.compile(r"\b(" + "|".join(re.escape(p) for p in phrases) + r")", re.I)
             for name, phrases in MENTION_PHRASES.items()}
#: Phrases removed before a class's mentions are looked for ("pericardial effusion" is no pleural one).
_NOT_MENTIONS = {"Pleural Effusion": re.compile(r"pericardial effusions?", re.I)}
_CALCIFIED_NODULE = re.compile(r"calcified (nodule|nodular)|granulom", re.I)


def hedged_mentions(text: str) -> np.ndarray:
    """(14,) bool: the classes a hedged sentence of `text` mentions (see the comment above)."""
    out = np.zeros(NUM_CLASSES, dtype=bool)
    for sentence in re.split(r"(?<=[.;])\s+|\n+", text or ""):
        if not _UNCERTAIN_CUES.search(sentence) or _NEGATION_CUES.search(sentence):
            continue
        for name, pattern in _MENTIONS.items():
            if pattern.search(_NOT_MENTIONS[name].sub(" ", sentence) if name in _NOT_MENTIONS else sentence):
                if name == "Lung Lesion" and _CALCIFIED_NODULE.search(sentence) and not re.search(
                        r"\bmass\b|neoplasm|tumor|carcinoma|malignan|cancer", sentence, re.I):
                    continue  # "may be a calcified granuloma": no lesion in CheXpert's sense
                out[CLASS_INDEX[name]] = True
    return out


def uncertain_classes(terms: Sequence[MeshTerm], text: Optional[str] = None) -> np.ndarray:
    """(14,) bool: classes uncertain in a report, i.e. not asserted by any term, but named by a
    `borderline` term or (when `text` is given) by a hedged sentence of the text."""
    positive, borderline, _ = _positive_and_borderline(terms)
    hedged = hedged_mentions(text) if text else np.zeros(NUM_CLASSES, dtype=bool)
    return (borderline | hedged) & ~positive


LABEL_POLICIES = ("zeros", "ones", "ignore")


def report_labels(terms: Sequence[MeshTerm], text: Optional[str] = None,
                  policy: str = "zeros") -> tuple[np.ndarray, np.ndarray]:
    """(labels (14,) float32, known (14,) float32) of one report under `data.label_policy`.

    Positive: a term names the class (not only as `borderline`). Uncertain (`uncertain_classes`):
    -> 0 (`zeros`), 1 (`ones`) or label 0 with known 0 (`ignore`: left out of the loss and the
    AUCs, as MIMIC-CXR's -1). No Finding is never uncertain; it is 0 when a term reports an
    abnormality (see `label_vector`) or when a pathology class is uncertain (CheXpert's aggregation:
    No Finding only when no pathology is positive or uncertain).
    """
    if policy not in LABEL_POLICIES:
        raise ValueError(f"label policy {policy!r}: use one of {', '.join(LABEL_POLICIES)}")
    positive, _, abnormal = _positive_and_borderline(terms)
    uncertain = uncertain_classes(terms, text)
    uncertain[CLASS_INDEX[NO_FINDING]] = False
    labels = positive.astype(np.float32)
    known = np.ones(NUM_CLASSES, dtype=np.float32)
    if policy == "ones":
        labels[uncertain] = 1.0
    elif policy == "ignore":
        known[uncertain] = 0.0
    pathology_uncertain = any(uncertain[CLASS_INDEX[c]] for c in PATHOLOGY_CLASSES)
    labels[CLASS_INDEX[NO_FINDING]] = 0.0 if (abnormal or pathology_uncertain) else 1.0
    return labels, known


def unmapped_heads(reports: Iterable[Report], min_count: int = 1) -> dict[str, int]:
    """Heads seen >= `min_count` times that name no class in any occurrence, with their counts.

    Heads are grouped as matched (case, commas and spacing ignored) and reported in the spelling
    seen most often, most frequent first.
    """
    counts: Counter[str] = Counter()
    spellings: dict[str, Counter[str]] = defaultdict(Counter)
    mapped: set[str] = set()
    for report in reports:
        for term in report.major:
            key = _key(term.head)
            counts[key] += 1
            spellings[key][term.head] += 1
            if classes_of_term(term):
                mapped.add(key)
    return {spellings[key].most_common(1)[0][0]: n for key, n in counts.most_common()
            if n >= min_count and key not in mapped}
