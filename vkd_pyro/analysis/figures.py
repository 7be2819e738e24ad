"""The paper's figures for a trained run, written as PNGs into <run>/figures/.

`vkd-pyro figures --run DIR [--compare DIR2] [--records N]`:

- ``tsne.png`` (Fig. 2): t-SNE of z_I, the means of the conditional prior p(z_I | x_I) on the test
  split, one point per record coloured by its most frequent positive class (the positive class with
  the most positives in the split; grey for records with none); with ``--compare`` (e.g. the
  image-only run) the two runs side by side, the same colours.
- ``record_<k>_<id>.png`` (Fig. 3) for N test records (those with the most findings first): the
  radiograph with the Grad-CAM heatmap (Selvaraju et al. 2017) of the image backbone's last conv
  block for the predicted class, and the report with each word shaded by the attention weight of the
  trainable Transformer block: the [CLS] row averaged over heads, WordPiece pieces ('##') merged into
  words by averaging their weights, special tokens left out, shaded from white (the report's
  smallest word weight) to dark red (its largest). The predicted class is the finding (No Finding left out: it has no place in the image)
  with the largest Monte Carlo predictive probability; its score for Grad-CAM is the logit of
  p(y_c | x_I, z_I) at z_I = the prior mean (Monte Carlo for families without one). ``attention.json`` keeps the words and weights.
- ``roc.png``: ROC curves of the test split (images alone, S samples).
- ``training_curves.png``: the ELBO terms, beta and validation AUC per epoch (history.csv).
- ``latent_units.png``: posterior collapse, the variance over records of the posterior (and prior)
  means per dimension against the active-unit threshold 0.01, and the mean KL per dimension.
- ``reliability.png``: the reliability diagram of the predictive with its ECE (10 bins).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.manifold import TSNE
from torch import nn
from transformers import AutoTokenizer

from vkd_pyro.analysis.diagnostics import (
    collapse_report,
    distribution_mean,
    expected_calibration_error,
    latent_statistics,
)
from vkd_pyro.analysis.runs import load_run
from vkd_pyro.classes import CLASSES
from vkd_pyro.data.prepare import prepare_data
from vkd_pyro.data.splits import split_label_mask
from vkd_pyro.encoders.image import DenseNet121Encoder, SmallCNN
from vkd_pyro.encoders.text import resolve_text_model
from vkd_pyro.errors import UserError
from vkd_pyro.files import atomic_path, write_json
from vkd_pyro.training.evaluate import plot_roc, predict_split, seeded

TSNE_MAX_RECORDS = 2000
SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "<s>", "</s>", "<pad>")


# --------------------------------------------------------------------------- t-SNE (Fig. 2)


def primary_classes(labels: np.ndarray, classes: Sequence[str] = CLASSES) -> list[Optional[str]]:
    """Per record, its positive class with the most positives in `labels` (None without positives)."""
    labels = np.asarray(labels)
    counts = labels.sum(axis=0)
    out = []
    for row in labels:
        positive = np.flatnonzero(row > 0.5)
        out.append(classes[int(positive[np.argmax(counts[positive])])] if positive.size else None)
    return out


def tsne_embedding(points: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-d t-SNE (scikit-learn, PCA init) with perplexity min(30, (N - 1) / 3), at least 2 (N >= 4);
    the exact gradient up to 300 records, Barnes-Hut above."""
    points = np.asarray(points, dtype=np.float64)
    if len(points) < 4:
        raise UserError(f"t-SNE needs at least 4 records, the split has {len(points)}")
    perplexity = float(max(2.0, min(30.0, (len(points) - 1) / 3.0)))
    method = "exact" if len(points) <= 300 else "barnes_hut"
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                method=method).fit_transform(points)


def plot_tsne(panels: Sequence[tuple[str, np.ndarray, Sequence[Optional[str]]]], path: Path) -> None:
    """One scatter per (title, embedding (N, 2), class name per point), shared colours and legend."""
    present = [c for c in CLASSES if any(c in names for _, _, names in panels)]
    cmap = matplotlib.colormaps.get_cmap("tab20")
    colours = {c: cmap(CLASSES.index(c) % 20) for c in present}
    fig = Figure(figsize=(5.2 * len(panels) + 1.8, 5.0))
    axs = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, emb, names) in zip(axs[0], panels):
        names = list(names)
        none = [i for i, n in enumerate(names) if n is None]
        if none:
            ax.scatter(emb[none, 0], emb[none, 1], s=10, c="lightgrey", label="(no positive class)")
        for c in present:
            idx = [i for i, n in enumerate(names) if n == c]
            if idx:
                ax.scatter(emb[idx, 0], emb[idx, 1], s=14, color=colours[c], label=c)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labels = [], []
    for ax in axs[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.suptitle("t-SNE of z_I (prior means, test split), coloured by the most frequent positive class", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / (5.2 * len(panels) + 1.8), 0.95))
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)


# --------------------------------------------------------------------------- Grad-CAM (Fig. 3, image)


def gradcam_layer(encoder: nn.Module) -> nn.Module:
    """The image encoder's last conv block, whose output Grad-CAM weighs.

    densenet121: `features` (its last dense block, transition and norm5; forward then applies ReLU
    and pooling); small_cnn: the ReLU of the last conv block (before its max pool); any other
    encoder: its last Conv2d.
    """
    if isinstance(encoder, DenseNet121Encoder):
        return encoder.features
    if isinstance(encoder, SmallCNN):
        return [m for m in encoder.features if isinstance(m, nn.ReLU)][-1]
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError(f"Grad-CAM: the image encoder {type(encoder).__name__} has no convolution")
    return convs[-1]


def grad_cam(module, images: torch.Tensor, class_index: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps (B, H, W) in [0, 1] of `images` (B, 1, H, W) for one class per image.

    The score is the class logit of p(y | x_I, z_I) at z_I = the prior mean; the map is
    ReLU(sum_k alpha_k A_k) with alpha_k the spatial mean of d score / d A_k over the target layer's
    activations A, upsampled bilinearly to the image and divided by its maximum (0 where it is 0).
    """
    model = module.model
    layer = gradcam_layer(model.image_encoder)
    captured = {}

    def hook(_module, _inputs, output):
        captured["a"] = output

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            features = model.image_encoder(images)
            z = distribution_mean(model.prior(features))
            logits = model.class_logits(z, features)
            index = torch.as_tensor(class_index, device=logits.device).long().view(-1, 1)
            score = logits.gather(1, index).sum()
            activation = captured["a"]
            (grad,) = torch.autograd.grad(score, activation)
    finally:
        handle.remove()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).cpu()


# --------------------------------------------------------------------------- report attention (Fig. 3, text)


def load_tokenizer(name: str):
    """The frozen text encoder's tokenizer, offline."""
    return AutoTokenizer.from_pretrained(resolve_text_model(name), local_files_only=True)


def report_tokens(tokenizer, text: str, max_tokens: int) -> list[str]:
    """The WordPiece tokens of `text` exactly as the frozen encoder saw them ([CLS] ... [SEP], truncated)."""
    ids = tokenizer([str(text)], add_special_tokens=True, truncation=True, max_length=int(max_tokens))["input_ids"][0]
    return tokenizer.convert_ids_to_tokens(ids)


@torch.no_grad()
def cls_attention(text_head, token_states: torch.Tensor) -> np.ndarray:
    """Attention of the [CLS] query over the report's tokens (T,), averaged over the block's heads."""
    states = token_states.float().unsqueeze(0)
    mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
    _, attention = text_head(states, mask, return_attention=True)  # (1, heads, T, T)
    return attention[0, :, 0, :].mean(dim=0).cpu().numpy()


def merge_wordpieces(tokens: Sequence[str], weights: Sequence[float],
                     special: Sequence[str] = SPECIAL_TOKENS) -> tuple[list[str], list[float]]:
    """Words and their weights: '##' continuation pieces join the word before them and the word's
    weight is the mean of its pieces' weights (the paper's Fig. 3); special tokens are left out."""
    if len(tokens) != len(weights):
        raise ValueError(f"{len(tokens)} tokens but {len(weights)} weights")
    words, groups = [], []
    for token, weight in zip(tokens, weights):
        if token in special:
            continue
        if token.startswith("##") and words:
            words[-1] += token[2:]
            groups[-1].append(float(weight))
        else:
            words.append(token[2:] if token.startswith("##") else token)
            groups.append([float(weight)])
    return words, [float(np.mean(g)) for g in groups]


def draw_words(ax, words: Sequence[str], shades: Sequence[float], fontsize: float = 9.0) -> None:
    """Words left to right, wrapped at the axes' width, each on a background of Reds(shade in [0, 1])."""
    ax.axis("off")
    renderer = ax.figure.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    cmap = matplotlib.colormaps.get_cmap("Reds")
    x, y, line, space = 0.0, 1.0, None, None
    for word, shade in zip(words, shades):
        text = ax.text(x, y, word, transform=ax.transAxes, fontsize=fontsize, va="top", ha="left",
                       color="white" if shade > 0.65 else "black",
                       bbox=dict(boxstyle="square,pad=0.12", facecolor=cmap(0.04 + 0.86 * float(shade)), edgecolor="none"))
        extent = text.get_window_extent(renderer)
        width = extent.width / box.width
        if line is None:
            line = 1.6 * extent.height / box.height
            space = 0.45 * extent.height / box.width
        if x > 0 and x + width > 1.0:
            x, y = 0.0, y - line
            text.set_position((x, y))
        if y - line < 0:
            text.set_text("…")
            break
        x += width + space


def plot_record(image: np.ndarray, cam: Optional[np.ndarray], words: Sequence[str], weights: Optional[Sequence[float]],
                title: str, cam_title: str, path: Path) -> None:
    """Fig. 3 for one record: the radiograph with the Grad-CAM overlay, the report shaded by weight."""
    fig = Figure(figsize=(11.5, 4.6))
    FigureCanvasAgg(fig)  # draw_words measures text with the Agg renderer
    ax_img = fig.add_axes((0.02, 0.06, 0.34, 0.80))
    ax_txt = fig.add_axes((0.40, 0.06, 0.58, 0.76))
    ax_img.imshow(image, cmap="gray", vmin=0, vmax=1)
    if cam is not None:
        ax_img.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax_img.set_title(cam_title, fontsize=9)
    ax_img.axis("off")
    if weights is None:
        draw_words(ax_txt, list(words), [0.0] * len(words))
        ax_txt.set_title("report (this run has no EHR branch: no attention)", fontsize=9, loc="left")
    else:
        low, high = (min(weights), max(weights)) if len(weights) else (0.0, 0.0)
        shades = [(w - low) / (high - low) if high > low else 0.5 for w in weights]
        draw_words(ax_txt, list(words), shades)
        ax_txt.set_title(f"report: [CLS] attention of the trainable Transformer block, heads averaged,\n"
                         f"WordPieces averaged into words; white {low:.2g} to dark red {high:.2g}",
                         fontsize=9, loc="left")
    fig.suptitle(title, fontsize=10)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)


def choose_records(labels: np.ndarray, count: int) -> list[int]:
    """Positions in the split of `count` records, those with the most findings (No Finding aside) first."""
    findings = np.asarray(labels)[:, [i for i, c in enumerate(CLASSES) if c != "No Finding"]].sum(axis=1)
    order = sorted(range(len(findings)), key=lambda i: (-findings[i], i))
    return order[:count]


# --------------------------------------------------------------------------- curves


def plot_training_curves(history_csv: Path, path: Path, terms: Sequence) -> None:
    """The objective's `terms` (`Objective.terms`: for vkd loss, image NLL, text NLL, KL), beta and the
    validation macro AUC per epoch from history.csv, a panel each."""
    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UserError(f"{history_csv}: no epochs recorded")
    epochs = [int(r["epoch"]) for r in rows]
    panels = ([(t.name, t.label) for t in terms]
              + [("beta", "beta (mean over the epoch)"), ("val_macro_auc", "validation macro AUC")])
    columns = 3
    rows_of_panels = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(12, 3.1 * rows_of_panels))
    axs = np.atleast_1d(fig.subplots(rows_of_panels, columns))
    for ax in axs.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (column, label) in zip(axs.flat, panels):
        values = [float(r[column]) if r.get(column) not in (None, "") else np.nan for r in rows]
        ax.plot(epochs, values, marker="o", ms=3)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle("training curves (training split means per epoch; AUC on validation)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)


def plot_latent_units(report: dict, path: Path) -> None:
    """Posterior collapse: per-dimension variance of the means (sorted) and mean KL per dimension."""
    fig = Figure(figsize=(11, 4))
    axs = fig.subplots(1, 2)
    ax = axs[0]
    for name, colour in (("guide", "tab:red"), ("prior", "tab:blue")):
        if f"{name}_mean_variance" in report:
            variance = np.sort(np.asarray(report[f"{name}_mean_variance"]))[::-1]
            ax.semilogy(np.arange(1, len(variance) + 1), np.maximum(variance, 1e-12), color=colour,
                        label=f"{'q(z_T|x_T)' if name == 'guide' else 'p(z_I|x_I)'} means: "
                              f"{report[f'{name}_active_units']} active")
    ax.axhline(report["threshold"], ls=":", color="black", label=f"threshold {report['threshold']}")
    ax.set_xlabel("latent dimension (sorted)")
    ax.set_ylabel("Var over records of E[z_d]")
    ax.set_title("active units (Burda et al. 2015)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axs[1]
    if "kl_per_dim" in report:
        kl = np.sort(np.asarray(report["kl_per_dim"]))[::-1]
        ax.bar(np.arange(1, len(kl) + 1), kl, width=1.0, color="tab:purple")
        ax.set_title(f"KL(q || p) per dimension, mean over records (total {report['kl_total']:.2f})", fontsize=9)
        ax.set_xlabel("latent dimension (sorted)")
    else:
        ax.text(0.5, 0.5, "no diagonal Gaussian guide in this run", ha="center", va="center")
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)


def plot_reliability(calibration: dict, path: Path) -> None:
    """Reliability diagram: frequency of positives against mean probability per bin, with the ECE."""
    table = [b for b in calibration["table"] if b["count"]]
    fig = Figure(figsize=(9, 4))
    axs = fig.subplots(1, 2)
    ax = axs[0]
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.plot([b["confidence"] for b in table], [b["frequency"] for b in table], marker="o")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("fraction positive")
    ax.set_title(f"ECE {calibration['ece']:.4f} ({calibration['bins']} equal-width bins, "
                 f"{calibration['pairs']} record-class pairs)", fontsize=9)
    axs[1].bar([(b["lower"] + b["upper"]) / 2 for b in calibration["table"]],
               [b["count"] for b in calibration["table"]], width=1.0 / calibration["bins"], edgecolor="white")
    axs[1].set_yscale("log")
    axs[1].set_xlabel("predicted probability")
    axs[1].set_title("pairs per bin", fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)


# --------------------------------------------------------------------------- all figures of a run


def _test_prior_means(run, data) -> tuple[np.ndarray, np.ndarray]:

    stats = latent_statistics(run.module, data.splits["test"], run.config.train.eval_batch_size, run.device,
                              with_guide=False)
    means, labels = stats["prior_mean"], stats["labels"]
    if len(means) > TSNE_MAX_RECORDS:
        keep = np.random.default_rng(0).choice(len(means), TSNE_MAX_RECORDS, replace=False)
        means, labels = means[keep], labels[keep]
    return means, labels


def _run_title(run, folder) -> str:
    return f"{run.objective.title}\n{Path(folder).name}"


def make_figures(run_dir, compare: Optional[str] = None, records: int = 2, samples: Optional[int] = None,
                 say=print, trust_code: bool = False) -> list[Path]:
    """Write the figures of the module docstring into <run_dir>/figures/ and return their paths.
    trust_code: import a prior or guide the runs' configs name by import path (`load_run`)."""
    if records < 0:
        raise UserError(f"--records: must be >= 0, got {records}")
    folder = Path(run_dir)
    run = load_run(str(folder), trust_code=trust_code)
    config, module, device, objective = run.config, run.module, run.device, run.objective
    if objective.predicts_from != "images":
        raise UserError(f"{folder}: the figures read the image model, and a {objective.name} run has none")
    data = prepare_data(config, with_reports=objective.reads_reports)
    test = data.splits["test"]
    if len(test) == 0:
        raise UserError(f"{folder}: the test split is empty")
    out = folder / "figures"
    out.mkdir(exist_ok=True)
    written = []
    samples = samples or config.inference.test_samples

    # Fig. 2: t-SNE of z_I, this run and the one to compare with.
    means, labels = _test_prior_means(run, data)
    panels = [(_run_title(run, folder), tsne_embedding(means), primary_classes(labels))]
    if compare:
        other = load_run(str(compare), trust_code=trust_code)
        other_data = prepare_data(other.config, with_reports=False)
        other_means, other_labels = _test_prior_means(other, other_data)
        panels.append((_run_title(other, compare), tsne_embedding(other_means), primary_classes(other_labels)))
    plot_tsne(panels, out / "tsne.png")
    written.append(out / "tsne.png")

    # The predictive on the test split: ROC and reliability.
    with seeded(0, device):
        probs, _, test_labels = predict_split(module, test, samples, config.train.eval_batch_size, device)
    mask = split_label_mask(test)  # unknown labels are left out of every figure, as from metrics.json
    plot_roc(test_labels, probs, CLASSES, out / "roc.png", title=f"{config.inference.objective}, test",
             mask=mask, evaluated=config.data.eval_classes)
    written.append(out / "roc.png")
    plot_reliability(expected_calibration_error(probs, test_labels, mask=mask), out / "reliability.png")
    written.append(out / "reliability.png")

    # Training curves and posterior collapse.
    if (folder / "history.csv").is_file():
        plot_training_curves(folder / "history.csv", out / "training_curves.png", objective.terms)
        written.append(out / "training_curves.png")
    stats = latent_statistics(module, test, config.train.eval_batch_size, device, with_guide=objective.has_guide)
    plot_latent_units(collapse_report(stats), out / "latent_units.png")
    written.append(out / "latent_units.png")

    # Fig. 3: Grad-CAM and report attention for chosen records.
    chosen = choose_records(test_labels, min(records, len(test)))
    with_text = objective.has_guide and getattr(test, "token_states", None) is not None
    tokenizer = load_tokenizer(config.text_encoder.name) if chosen else None
    findings = [i for i, c in enumerate(CLASSES) if c != "No Finding"]
    kept = []
    for k, position in enumerate(chosen):
        index = int(test.indices[position])
        item = test[position]
        image = torch.as_tensor(item["img"], dtype=torch.float32).unsqueeze(0).to(device)
        predicted = findings[int(np.argmax(probs[position, findings]))]
        cam = grad_cam(module, image, [predicted])[0].numpy()
        text = data.dataset.texts[index]
        tokens = report_tokens(tokenizer, text, config.text_encoder.max_tokens)
        weights = None
        if with_text:
            states = test.token_states[index].to(device)
            if len(tokens) != states.shape[0]:
                raise UserError(f"record {index}: {len(tokens)} tokens but {states.shape[0]} cached token states "
                                f"(the tokenizer of {config.text_encoder.name} does not match the cache)")
            attention = cls_attention(module.guide.text_head, states)
            words, weights = merge_wordpieces(tokens, attention)
        else:
            words, _ = merge_wordpieces(tokens, [0.0] * len(tokens))
        record_id = str(data.dataset.groups[index]) if hasattr(data.dataset, "groups") else str(index)
        positives = [CLASSES[c] for c in np.flatnonzero(test_labels[position] > 0.5)] or ["none"]
        title = f"{record_id}: labels {', '.join(positives)}"
        cam_title = f"Grad-CAM for {CLASSES[predicted]} (p = {probs[position, predicted]:.2f})"
        name = "record_{}_{}.png".format(k + 1, "".join(ch if ch.isalnum() else "_" for ch in record_id))
        plot_record(np.asarray(item["img"])[0], cam, words, weights, title, cam_title, out / name)
        written.append(out / name)
        kept.append({"record": record_id, "dataset_index": index, "labels": positives,
                     "predicted": CLASSES[predicted], "probability": float(probs[position, predicted]),
                     "words": words, "weights": weights, "figure": name})
    write_json(out / "attention.json", kept)
    say(f"wrote {len(written)} figures to {out}/: " + ", ".join(p.name for p in written))
    return written
