"""Evaluation from images alone (Algorithm 2): Monte Carlo predictive, per-class ROC AUC, the table,
and (re-exported from `vkd_pyro.training.predictions`) a split's predictions written to predictions_<split>.npz.

The predictive probability of class c is the mean over S prior samples z_I^(s) ~ p(z_I|x_I) of
p(y_c = 1 | x_I, z_I^(s)); its spread is their standard deviation. AUCs are scikit-learn's.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve
from torch.utils.data import DataLoader

from vkd_pyro.classes import CLASSES
from vkd_pyro.config import Config
from vkd_pyro.data.batching import collate
from vkd_pyro.data.splits import split_label_mask, split_record_ids
from vkd_pyro.files import atomic_path, write_json
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.training import distributed
from vkd_pyro.training.distributed import say
from vkd_pyro.training.predictions import write_predictions


@torch.no_grad()
def predict_split(module: VKDModule, split, num_samples: int, batch_size: int = 256, device="cpu",
                  num_workers: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean probability (N, C), Monte Carlo std (N, C), labels (N, C)) for a split, images only."""
    module.eval()
    means, stds, labels = [], [], []
    loader = DataLoader(split, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers)
    for batch in loader:
        probs = module.predict(batch.images.to(device), num_samples)
        means.append(probs.mean(0).cpu())
        stds.append(probs.std(0, unbiased=False).cpu())
        labels.append(batch.labels)
    return torch.cat(means).numpy(), torch.cat(stds).numpy(), torch.cat(labels).numpy()


@torch.no_grad()
def teacher_split(module: VKDModule, split, num_samples: int, batch_size: int = 256, device="cpu",
                  num_workers: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The teacher q(y|z_T) on a split's *reports*: (mean probability (N, C), per-class NLL (N, C), labels (N, C)).

    For each record, S = `num_samples` draws z_T^(s) ~ q(z_T | x_T) (the guide, dropout off):

        probability_c = 1/S sum_s sigmoid(logit_c(z_T^(s)))
        nll_c         = 1/S sum_s -log q(y_c | z_T^(s))     (the mean NLL per draw, as L_MI is trained)

    so that summing nll over the known classes and averaging over records gives the teacher's test
    NLL in the units of the training's text NLL (a label-frequency classifier's NLL is its baseline).
    Unknown labels are not masked here; :func:`teacher_metrics` leaves them out.
    """
    module.eval()
    means, nlls, labels = [], [], []
    loader = DataLoader(split, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers)
    for batch in loader:
        if batch.token_states is None:
            raise ValueError("the teacher reads reports: prepare the data with reports")
        logits = module.teacher_logits(batch.token_states.to(device), batch.token_mask.to(device), num_samples)
        target = batch.labels.to(device).expand(logits.shape)
        nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(0)
        means.append(torch.sigmoid(logits).mean(0).cpu())
        nlls.append(nll.cpu())
        labels.append(batch.labels)
    return torch.cat(means).numpy(), torch.cat(nlls).numpy(), torch.cat(labels).numpy()


def teacher_metrics(probs: np.ndarray, nll: np.ndarray, labels: np.ndarray, mask: Optional[np.ndarray],
                    config: Config, samples: int) -> dict:
    """The `teacher` block of metrics.json from :func:`teacher_split`'s arrays: per-class, macro and
    micro AUC of q(y|z_T) (masked labels left out, as in `auc_metrics`) and its NLL, the mean over
    records of the per-draw NLL summed over the known (and evaluated) classes."""
    metrics = auc_metrics(labels, probs, CLASSES, mask, config.data.eval_classes)
    keep = np.ones(labels.shape, dtype=bool) if mask is None else np.asarray(mask) > 0
    if config.data.eval_classes is not None:
        keep = keep & np.array([c in config.data.eval_classes for c in CLASSES])
    return {"evaluated_on": "reports", "what": "q(y|z_T), z_T ~ q(z_T|x_T): the report branch (teacher)",
            "auc": metrics["auc"], "macro_auc": metrics["macro_auc"], "micro_auc": metrics["micro_auc"],
            "nll": float((nll * keep).sum(1).mean()) if len(nll) else None,
            "nll_kind": "mean over records of the Monte Carlo mean over draws of -log q(y|z_T), known classes",
            "S": samples}


def auc_metrics(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], mask: Optional[np.ndarray] = None,
                evaluated: Optional[Sequence[str]] = None) -> dict:
    """Per-class ROC AUC (None where the split has one label value), their macro mean over the
    defined ones, and the micro AUC over all (record, class) pairs of the defined classes.

    `mask` (N, C), when given, leaves out the entries where it is 0 (unknown labels) from every
    figure, positives included; `evaluated`, when given, names the classes to score: the others
    get AUC None and stay out of the macro and micro AUC (e.g. the 7 classes ChestX-ray14 shares)."""
    keep = np.ones(labels.shape, dtype=bool) if mask is None else np.asarray(mask) > 0
    auc: dict[str, Optional[float]] = {}
    for c, name in enumerate(classes):
        column = labels[keep[:, c], c]
        scored = evaluated is None or name in evaluated
        auc[name] = (float(roc_auc_score(column, probs[keep[:, c], c]))
                     if scored and 0 < column.sum() < len(column) else None)
    defined = [c for c, name in enumerate(classes) if auc[name] is not None]
    macro = float(np.mean([auc[classes[c]] for c in defined])) if defined else None
    micro = (float(roc_auc_score(labels[:, defined][keep[:, defined]], probs[:, defined][keep[:, defined]]))
             if defined else None)
    positives = {name: int(labels[keep[:, c], c].sum()) for c, name in enumerate(classes)}
    return {"auc": auc, "macro_auc": macro, "micro_auc": micro, "positives": positives}


def _cell(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def format_auc_table(columns: Mapping[str, dict], classes: Sequence[str], positives: Optional[Mapping[str, int]] = None) -> str:
    """The paper's Table 1 layout: a row per class, a column per run, then Average (macro) and Micro."""
    names = list(columns)
    first = max(len(c) for c in list(classes) + ["Average (macro)"]) + 2
    widths = [max(8, len(n) + 2) for n in names]
    header = "".ljust(first) + "".join(n.rjust(w) for n, w in zip(names, widths))
    if positives is not None:
        header += "positives".rjust(11)
    rule = "-" * len(header)
    lines = [header, rule]
    for cls in classes:
        row = cls.ljust(first) + "".join(_cell(columns[n]["auc"].get(cls)).rjust(w) for n, w in zip(names, widths))
        if positives is not None:
            row += str(positives.get(cls, 0)).rjust(11)
        lines.append(row)
    lines.append(rule)
    lines.append("Average (macro)".ljust(first) + "".join(_cell(columns[n]["macro_auc"]).rjust(w) for n, w in zip(names, widths)))
    lines.append("Micro".ljust(first) + "".join(_cell(columns[n]["micro_auc"]).rjust(w) for n, w in zip(names, widths)))
    return "\n".join(lines)


def plot_roc(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path, title: str = "",
             mask: Optional[np.ndarray] = None, evaluated: Optional[Sequence[str]] = None) -> None:
    """One ROC curve per class with a defined AUC, and the micro-average, to a PNG (`mask` and
    `evaluated` as in `auc_metrics`)."""
    metrics = auc_metrics(labels, probs, classes, mask, evaluated)
    keep = np.ones(labels.shape, dtype=bool) if mask is None else np.asarray(mask) > 0
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.subplots()
    cmap = matplotlib.colormaps.get_cmap("tab20")
    for c, name in enumerate(classes):
        if metrics["auc"][name] is None:
            continue
        fpr, tpr, _ = roc_curve(labels[keep[:, c], c], probs[keep[:, c], c])
        ax.plot(fpr, tpr, lw=1.2, color=cmap(c), label=f"{name} ({metrics['auc'][name]:.2f})")
    defined = [c for c, n in enumerate(classes) if metrics["auc"][n] is not None]
    if defined:
        fpr, tpr, _ = roc_curve(labels[:, defined][keep[:, defined]], probs[:, defined][keep[:, defined]])
        ax.plot(fpr, tpr, lw=2.5, color="black", label=f"micro ({metrics['micro_auc']:.2f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    macro = metrics["macro_auc"]
    ax.set_title(f"{title} ROC, macro AUC {macro:.3f}" if macro is not None else f"{title} ROC")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)


def split_metrics(probs: np.ndarray, labels: np.ndarray, mask: Optional[np.ndarray], config: Config, split: str,
                  samples: int, extra: Optional[dict] = None) -> dict:
    """What metrics.json holds for one split: per-class, macro and micro AUC over the known labels
    (`mask`), the positives, and what produced them (objective, estimator, Monte Carlo counts)."""
    metrics = auc_metrics(labels, probs, CLASSES, mask, config.data.eval_classes)
    inf = config.inference
    return {"classes": list(CLASSES), "auc": metrics["auc"], "macro_auc": metrics["macro_auc"],
            "micro_auc": metrics["micro_auc"], "positives": metrics["positives"], "split": split,
            f"n_{split}": int(len(labels)), "objective": inf.objective, "elbo": inf.elbo,
            "mc": {"L": inf.num_particles, "M": inf.prior_samples, "S": samples},
            "dataset": config.data.name, "eval_classes": config.data.eval_classes, "seed": config.seed,
            **(extra or {})}


@contextmanager
def seeded(seed: Optional[int], device="cpu"):
    """Run the block with torch's RNG seeded to `seed`, restoring the caller's RNG state after it
    (None: the caller's RNG as it is)."""
    if seed is None:
        yield
        return
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def local_predictors(module: VKDModule, config: Config, samples: int, device, num_workers: int = 0):
    """(predict_images, predict_teacher) for :func:`evaluate_split` in one process: split ->
    (mean probabilities, labels) from images (Algorithm 2), split -> (mean probabilities, per-class
    NLL, labels) of q(y|z_T) on the reports."""
    batch = config.train.eval_batch_size

    def predict_images(split):
        probs, _, labels = predict_split(module, split, samples, batch, device, num_workers)
        return probs, labels

    def predict_teacher(split):
        return teacher_split(module, split, samples, batch, device, num_workers)

    return predict_images, predict_teacher


def evaluate_split(objective, split, name: str, samples: int, predict_images, predict_teacher,
                   extra: Optional[dict] = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """(metrics, probabilities, labels) of a split as metrics.json holds them: per-class, macro and
    micro AUC of the objective's predictions (from images, Algorithm 2; from the reports when it has
    no image side) and, for an objective with a teacher q(y|z_T), its `teacher` block. The image
    predictions are drawn before the teacher's. Seed the RNG around it (:func:`seeded`) for
    figures that another evaluation reproduces exactly."""
    config, extra = objective.config, dict(extra or {})
    if objective.predicts_from == "images":
        probs, labels = predict_images(split)
    mask = split_label_mask(split)  # unknown labels (ignore policy, unmapped classes) left out
    if objective.has_teacher:
        teacher_probs, nll, teacher_labels = predict_teacher(split)
        extra["teacher"] = teacher_metrics(teacher_probs, nll, teacher_labels, mask, config, samples)
    if objective.predicts_from == "reports":
        probs, labels = teacher_probs, teacher_labels
    metrics = split_metrics(probs, labels, mask, config, name, samples,
                            {"evaluated_on": objective.predicts_from, **extra})
    return metrics, probs, labels


def report(objective, data, out_dir: Path, split: str, samples: int, predict_images, predict_teacher,
           device="cpu", extra: Optional[dict] = None) -> dict:
    """Evaluate `split` (:func:`evaluate_split`, with the RNG seeded by the run's seed); write
    metrics.json (metrics_<split>.json for other splits), predictions_<split>.npz and roc.png
    (roc_<split>.png); print the AUC table. Returns the metrics. Only rank 0 writes."""
    config = objective.config
    with seeded(config.seed, device):
        result, probs, labels = evaluate_split(objective, data.splits[split], split, samples, predict_images,
                                               predict_teacher, extra)
    if not distributed.context().is_main:
        return result
    mask = split_label_mask(data.splits[split])
    suffix = "" if split == "test" else f"_{split}"
    write_json(out_dir / f"metrics{suffix}.json", result)
    write_predictions(out_dir, split, probs, labels, CLASSES, mask=mask, record_ids=split_record_ids(data.splits[split]),
                      meta={"seed": config.seed, "objective": config.inference.objective,
                            "eval_classes": config.data.eval_classes, "evaluated_on": result["evaluated_on"]})
    plot_roc(labels, probs, CLASSES, out_dir / f"roc{suffix}.png", title=f"{config.inference.objective}, {split}",
             mask=mask, evaluated=config.data.eval_classes)
    on_reports = objective.predicts_from == "reports"
    where = f"reports only (q(y|z_T), S={samples})" if on_reports else f"images only (Algorithm 2, S={samples})"
    say(f"\n{split} split, {len(labels)} records, {where}:")
    columns = {config.inference.objective: result}
    teacher = result.get("teacher")
    if teacher is not None and not on_reports:
        columns["teacher (reports)"] = teacher
    say(format_auc_table(columns, CLASSES, result["positives"]))
    if teacher is not None:
        say(f"teacher q(y|z_T) on the reports: macro AUC {_cell(teacher['macro_auc'])}, NLL {teacher['nll']:.3f}")
    say(f"\nwrote {out_dir}/metrics{suffix}.json, predictions_{split}.npz, roc{suffix}.png")
    return result
