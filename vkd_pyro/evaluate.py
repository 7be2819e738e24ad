"""Evaluation from images alone (Algorithm 2): Monte Carlo predictive, per-class ROC AUC, the table,
and (re-exported from `vkd_pyro.predictions`) a split's predictions written to predictions_<split>.npz.

The predictive probability of class c is the mean over S prior samples z_I^(s) ~ p(z_I|x_I) of
p(y_c = 1 | x_I, z_I^(s)); its spread is their standard deviation. AUCs are scikit-learn's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch.utils.data import DataLoader

from vkd_pyro.batching import collate
from vkd_pyro.module import VKDModule
# re-exported: a split's predictions on disk (numpy only, so `vkd-pyro compare` needs no torch)
from vkd_pyro.predictions import Predictions, read_predictions, write_predictions  # noqa: F401


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = auc_metrics(labels, probs, classes, mask, evaluated)
    keep = np.ones(labels.shape, dtype=bool) if mask is None else np.asarray(mask) > 0
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    cmap = plt.get_cmap("tab20")
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
    fig.savefig(path, dpi=110)
    plt.close(fig)

