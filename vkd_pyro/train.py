"""Training: SVI with Adam on mini-batches, KL annealing, early stopping, checkpoints and reports.

`prepare_data` is the one place that turns a config into data splits (with the frozen report
features, computed once and cached); `fit` runs SVI on the module's loss (minus Eq. 8) and keeps the
checkpoint with the best validation macro AUC; `report` evaluates a split from images alone and
writes metrics.json and roc.png.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pyro
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vkd_pyro.batching import LengthBucketSampler, PairedSplit, collate
from vkd_pyro.build import build_module, text_dims, uses_reports
from vkd_pyro.checkpoint import save_atomic
from vkd_pyro.classes import CLASSES
from vkd_pyro.config import Config, save_config
from vkd_pyro.data.registry import build_dataset
from vkd_pyro.data.splits import split_by_group
from vkd_pyro.errors import UserError
from vkd_pyro.evaluate import auc_metrics, format_auc_table, plot_roc, predict_split
from vkd_pyro.module import VKDModule
from vkd_pyro.schedules import KLSchedule

HISTORY_COLUMNS = ["epoch", "beta", "loss", "image_nll", "text_nll", "kl", "val_macro_auc", "seconds"]


def say(message: str) -> None:
    print(message, flush=True)


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when a GPU is visible, else cpu; `cuda` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for but no GPU is visible (use device=auto or device=cpu)")
    return torch.device(name)


@dataclass
class PreparedData:
    """A dataset, its train/validation/test splits and the frozen text encoder's block sizes."""

    dataset: object
    splits: dict
    dims: Optional[dict] = None
    notes: list = field(default_factory=list)


def prepare_data(config: Config, with_reports: bool = True) -> PreparedData:
    """Dataset, split by group, and (for objectives with a guide) cached frozen report states."""
    dataset = build_dataset(config)
    indices = split_by_group(dataset.groups, config.data.split, config.data.split_seed)
    notes = [f"{config.data.name}: {len(dataset)} records"
             + "".join(f"; {n} left out ({why})" for why, n in dataset.skipped.items() if n)
             + "; split " + " / ".join(f"{name} {len(idx)}" for name, idx in indices.items())]
    states, dims = None, None
    if with_reports and uses_reports(config):
        from vkd_pyro.encoders.text import FrozenTextEncoder, TextFeatureCache

        encoder = FrozenTextEncoder(config.text_encoder.name)
        cache = TextFeatureCache(config.resolved_cache_dir())
        started = time.perf_counter()
        states = cache.get_or_compute(encoder, dataset.texts, config.text_encoder.max_tokens)
        dims = text_dims(encoder)
        tokens = sum(int(s.shape[0]) for s in states) / max(1, len(states))
        notes.append(f"reports: {config.text_encoder.name}, frozen, {tokens:.0f} tokens on average "
                     f"(at most {config.text_encoder.max_tokens}); features ready in {time.perf_counter() - started:.1f} s")
    splits = {name: PairedSplit(dataset, idx, states) for name, idx in indices.items()}
    return PreparedData(dataset, splits, dims, notes)


def train_loader(split: PairedSplit, config: Config, generator: torch.Generator) -> DataLoader:
    """Shuffled training batches; with reports, batched by similar length (less padding)."""
    lengths = split.token_lengths()
    if lengths is None:
        return DataLoader(split, batch_size=config.train.batch_size, shuffle=True, collate_fn=collate,
                          generator=generator, num_workers=config.data.num_workers)
    sampler = LengthBucketSampler(lengths, config.train.batch_size, generator)
    return DataLoader(split, batch_sampler=sampler, collate_fn=collate, num_workers=config.data.num_workers)


def _check_finite(loss: torch.Tensor, terms, epoch: int, step: int) -> None:
    if not torch.isfinite(loss):
        bad = [k for k, v in terms.as_dict().items() if not math.isfinite(v)] or ["loss"]
        raise UserError(f"training diverged at epoch {epoch}, step {step}: {', '.join(bad)} is not finite "
                        "(lower train.lr; the best checkpoint so far is kept)")


def fit(config: Config, out_dir: Path, progress: Optional[bool] = None) -> dict:
    """Train as `config` says, write the run folder, and return the test metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    pyro.set_rng_seed(config.seed)
    started = time.perf_counter()
    data = prepare_data(config)
    for note in data.notes:
        say(note)
    if len(data.splits["train"]) == 0 or len(data.splits["validation"]) == 0:
        raise UserError("data: the train or validation split is empty (use more reports or change data.split)")
    save_config(config, out_dir / "config.yaml")

    module = build_module(config, data.dims).to(device)
    inf = config.inference
    say(f"objective {inf.objective} ({inf.elbo} ELBO), L={inf.num_particles} guide particles, "
        f"M={inf.prior_samples} prior samples, S={inf.test_samples} test samples; "
        f"{sum(p.numel() for p in module.parameters() if p.requires_grad):,} trainable parameters on {device}")
    optimizer = torch.optim.Adam(module.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    loader = train_loader(data.splits["train"], config, generator)
    schedule = KLSchedule(inf.annealing, len(loader))
    show = config.train.progress if progress is None else progress

    history_path = out_dir / "history.csv"
    with open(history_path, "w", newline="") as f:
        csv.writer(f).writerow(HISTORY_COLUMNS)
    best_auc, reference_auc, wait, best_epoch = -math.inf, -math.inf, 0, 0
    for epoch in range(1, config.train.max_epochs + 1):
        module.train()
        epoch_start = time.perf_counter()
        sums = dict.fromkeys(["beta", "loss", "image_nll", "text_nll", "kl"], 0.0)
        bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not show, file=sys.stderr)
        for step, batch in enumerate(bar, 1):
            beta = schedule(step)
            loss, terms = module(batch.to(device), beta)
            _check_finite(loss, terms, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for key in sums:
                sums[key] += getattr(terms, key)
            bar.set_postfix(loss=f"{terms.loss:.3f}", img=f"{terms.image_nll:.3f}", txt=f"{terms.text_nll:.3f}",
                            kl=f"{terms.kl:.2f}", beta=f"{beta:.2f}")
        means = {k: v / len(loader) for k, v in sums.items()}
        probs, _, labels = predict_split(module, data.splits["validation"], inf.test_samples,
                                         config.train.eval_batch_size, device)
        val_auc = auc_metrics(labels, probs, CLASSES)["macro_auc"]
        val_auc = float("nan") if val_auc is None else val_auc
        seconds = time.perf_counter() - epoch_start
        with open(history_path, "a", newline="") as f:
            csv.writer(f).writerow([epoch] + [f"{means[k]:.6g}" for k in HISTORY_COLUMNS[1:6]] + [f"{val_auc:.6g}", f"{seconds:.2f}"])
        mark = ""
        if val_auc > best_auc or best_epoch == 0:
            best_auc, best_epoch, mark = val_auc, epoch, " *"
            save_atomic({"module": module.state_dict(), "epoch": epoch, "val_macro_auc": val_auc,
                         "text_dims": data.dims, "config": config.to_dict()}, out_dir / "checkpoint.pt")
        # Early stopping with the paper's tolerance: only a relative gain above it counts as progress.
        if val_auc > reference_auc * (1 + config.train.tolerance):  # AUCs are >= 0; starts at -inf
            reference_auc, wait = val_auc, 0
        else:
            wait += 1
        say(f"epoch {epoch:3d}  loss {means['loss']:.4f}  image NLL {means['image_nll']:.4f}  "
            f"text NLL {means['text_nll']:.4f}  KL {means['kl']:.3f}  beta {means['beta']:.2f}  "
            f"val macro AUC {val_auc:.4f}  {seconds:.1f}s{mark}")
        if wait >= config.train.patience:
            say(f"early stop: no validation gain above {config.train.tolerance:.0%} for {wait} epochs; "
                f"best epoch {best_epoch}")
            break

    from vkd_pyro.checkpoint import load_checkpoint

    module.load_state_dict(load_checkpoint(out_dir / "checkpoint.pt")["module"])
    extra = {"best_epoch": best_epoch, "val_macro_auc": best_auc, "train_seconds": time.perf_counter() - started,
             "skipped": data.dataset.skipped}
    return report(module, data, config, out_dir, "test", inf.test_samples, device, extra)


def report(module: VKDModule, data: PreparedData, config: Config, out_dir: Path, split: str, samples: int,
           device, extra: Optional[dict] = None) -> dict:
    """Evaluate `split` from images alone; write metrics.json (metrics_<split>.json for other splits)
    and roc.png (roc_<split>.png); print the AUC table. Returns the metrics."""
    probs, _, labels = predict_split(module, data.splits[split], samples, config.train.eval_batch_size, device)
    metrics = auc_metrics(labels, probs, CLASSES)
    inf = config.inference
    result = {"classes": list(CLASSES), "auc": metrics["auc"], "macro_auc": metrics["macro_auc"],
              "micro_auc": metrics["micro_auc"], "positives": metrics["positives"], "split": split,
              f"n_{split}": int(len(labels)), "objective": inf.objective, "elbo": inf.elbo,
              "mc": {"L": inf.num_particles, "M": inf.prior_samples, "S": samples},
              "dataset": config.data.name, "seed": config.seed, **(extra or {})}
    suffix = "" if split == "test" else f"_{split}"
    (out_dir / f"metrics{suffix}.json").write_text(json.dumps(result, indent=2))
    plot_roc(labels, probs, CLASSES, out_dir / f"roc{suffix}.png", title=f"{inf.objective}, {split}")
    say(f"\n{split} split, {len(labels)} records, images only (Algorithm 2, S={samples}):")
    say(format_auc_table({inf.objective: metrics}, CLASSES, metrics["positives"]))
    say(f"\nwrote {out_dir}/metrics{suffix}.json, roc{suffix}.png, history.csv, checkpoint.pt, config.yaml")
    return result
