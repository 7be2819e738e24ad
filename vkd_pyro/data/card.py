"""`vkd-pyro data check`: build a config's dataset without training and print its dataset card.

The card says what training would see: records per split (and the groups that keep a split
clean), positives per class per split (and how many labels are known, when some are masked out),
views, report texts, records not selected by design and records skipped as bad, with why. Building
the dataset also decodes and validates every image (and fills the image cache), so a bad file is
found here, before any training.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Optional

import numpy as np

from vkd_pyro.classes import CLASSES
from vkd_pyro.config import Config
from vkd_pyro.data import label_noise, report_control
from vkd_pyro.data.registry import build_dataset
from vkd_pyro.data.splits import SPLIT_NAMES
from vkd_pyro.data.training_split import training_splits


def dataset_card(dataset, splits: dict, config: Config, seconds: Optional[float] = None,
                 entries: Optional[dict] = None) -> dict:
    """The card of a built dataset and its split indices, as plain JSON-able values.

    Keys: dataset, root, image_size, records, split_source, splits (split -> records, groups,
    positives per class, known labels per class or None, views), views, reports (None for
    image-only datasets), label_policy, label_noise and report_control (`entries` of
    `vkd_pyro.data.training_split.training_splits`; None when off), selection, skipped,
    skipped_examples, warnings, seconds.
    """
    entries = entries or {}
    data = config.data
    mask = getattr(dataset, "label_mask", None)
    views = getattr(dataset, "views", None)
    groups = np.asarray(dataset.groups)
    per_split = {}
    warnings = []
    for name in SPLIT_NAMES:
        idx = np.asarray(splits[name], dtype=np.int64)
        labels = dataset.labels[idx]
        known = None if mask is None else mask[idx]
        positives = labels if known is None else labels * known
        entry = {
            "records": int(len(idx)),
            "groups": int(len(set(groups[idx]))) if len(idx) else 0,
            "positives": {c: int(positives[:, k].sum()) for k, c in enumerate(CLASSES)},
            "known": None if known is None else {c: int(known[:, k].sum()) for k, c in enumerate(CLASSES)},
            "views": dict(Counter(views[i] for i in idx).most_common()) if views is not None else None,
        }
        per_split[name] = entry
        if name != "train" and len(idx):
            scored = data.eval_classes or list(CLASSES)
            undefined = [c for k, c in enumerate(CLASSES) if c in scored and
                         not 0 < entry["positives"][c] < (entry["known"][c] if known is not None else len(idx))]
            if undefined:
                warnings.append(f"{name}: no AUC for {', '.join(undefined)} (only one label value in the split)")
    empty = [name for name in SPLIT_NAMES if not per_split[name]["records"]]
    if empty:
        warnings.append(f"empty split(s): {', '.join(empty)} (training needs train and validation records)")
    straddling = _straddling_groups(groups, splits)
    if straddling:
        warnings.append(f"{straddling} groups (reports/patients) have records in more than one split")
    texts = getattr(dataset, "texts", None)
    reports = None
    if texts is not None:
        words = np.array([len(t.split()) for t in texts]) if texts else np.zeros(0)
        reports = {"records_with_text": int((words > 0).sum()), "records_without_text": int((words == 0).sum()),
                   "distinct_reports": len(set(texts)),
                   "words_median": float(np.median(words)) if len(words) else None,
                   "words_max": int(words.max()) if len(words) else None}
    official = getattr(dataset, "official_split", None) is not None
    return {
        "dataset": data.name, "root": data.root, "image_size": data.image_size, "records": int(len(dataset)),
        "split_source": "official" if official else f"by group, fractions {data.split}, seed {data.split_seed}",
        "splits": per_split,
        "views": dict(Counter(views).most_common()) if views is not None else None,
        "reports": reports,
        "label_policy": ({"uncertain": data.label_policy, "blank": data.blank_policy}
                         if data.name == "mimic_cxr" else None),
        "masked_labels": mask is not None,
        "label_noise": entries.get("label_noise"),
        "report_control": entries.get("report_control"),
        "selection": dict(getattr(dataset, "selection", {}) or {}),
        "skipped": dict(dataset.skipped),
        "skipped_examples": dict(getattr(dataset, "skipped_examples", {}) or {}),
        "on_bad_record": data.on_bad_record,
        "warnings": warnings,
        "seconds": None if seconds is None else round(float(seconds), 3),
    }


def _straddling_groups(groups: np.ndarray, splits: dict) -> int:
    """How many groups have records in more than one split (0 for a clean split)."""
    seen: dict[str, set] = {}
    for name in SPLIT_NAMES:
        for g in set(groups[np.asarray(splits[name], dtype=np.int64)]):
            seen.setdefault(g, set()).add(name)
    return sum(1 for s in seen.values() if len(s) > 1)


def format_card(card: dict) -> str:
    """The card as text: a header, the split table, views, reports, left-out counts, class table."""
    lines = [f"dataset card: {card['dataset']}" + (f" ({card['root']})" if card["root"] else "")
             + f", images {card['image_size']} px" + (f", built in {card['seconds']:.1f} s" if card["seconds"] else "")]
    splits = card["splits"]
    lines.append(f"records: {card['records']} (split {card['split_source']}): "
                 + ", ".join(f"{n} {splits[n]['records']} ({splits[n]['groups']} groups)" for n in SPLIT_NAMES))
    if card["views"] is not None:
        lines.append("views: " + ", ".join(f"{v} {n}" for v, n in card["views"].items()))
    reports = card["reports"]
    if reports is None:
        lines.append("reports: none (image-only dataset: train with inference.objective=image_only)")
    else:
        median = f", median {reports['words_median']:.0f} words, max {reports['words_max']}" if reports["words_max"] is not None else ""
        lines.append(f"reports: {reports['records_with_text']} records with report text "
                     f"({reports['distinct_reports']} distinct{median}); {reports['records_without_text']} without")
    if card["label_policy"]:
        lines.append(f"labels: uncertain (-1) -> {card['label_policy']['uncertain']}, "
                     f"blank -> {card['label_policy']['blank']}")
    if card["masked_labels"]:
        lines.append("labels: some are unknown and masked out of the likelihood and the AUCs (known counts below)")
    noise, control = card.get("label_noise"), card.get("report_control")
    if noise:
        lines.append(label_noise.describe(noise) + ":")
        lines.append("  " + "; ".join(f"{c} {noise['positives_before'][c]} -> {noise['positives_after'][c]} "
                                      f"(-{noise['to_negative'][c]} +{noise['to_positive'][c]})" for c in CLASSES))
    if control:
        lines.append(report_control.describe(control))
    if card["selection"]:
        lines.append("not selected: " + "; ".join(f"{why}: {n}" for why, n in card["selection"].items()))
    skipped = {why: n for why, n in card["skipped"].items() if n}
    if skipped:
        lines.append(f"skipped ({sum(skipped.values())} in all, data.on_bad_record={card['on_bad_record']}):")
        for why, n in skipped.items():
            examples = card["skipped_examples"].get(why) or []
            lines.append(f"  {n:6d}  {why}" + (f"  e.g. {examples[0]}" if examples else ""))
    else:
        lines.append("skipped: none")
    masked = card["masked_labels"]
    first = max(len(c) for c in CLASSES) + 2
    width = 18 if masked else 11
    lines.append("")
    lines.append("positives" + (" / known labels" if masked else "") + " per class and split:")
    lines.append("class".ljust(first) + "".join(n.rjust(width) for n in SPLIT_NAMES))
    for c in CLASSES:
        cells = []
        for n in SPLIT_NAMES:
            entry = splits[n]
            cell = str(entry["positives"][c]) + (f" / {entry['known'][c]}" if masked else "")
            cells.append(cell.rjust(width))
        lines.append(c.ljust(first) + "".join(cells))
    for warning in card["warnings"]:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def check(config: Config, with_reports: bool) -> dict:
    """Build `config`'s dataset and the splits training sees (validating every record and image;
    `vkd_pyro.data.training_split`) and return its card
    (`with_reports`: the config's objective reads the reports, which an image-only dataset refuses)."""
    started = time.perf_counter()
    dataset = build_dataset(config, with_reports)
    splits, _, entries = training_splits(dataset, config)
    return dataset_card(dataset, splits, config, time.perf_counter() - started, entries)
