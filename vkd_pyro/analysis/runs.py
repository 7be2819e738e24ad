"""The Python API: `train(config, out, **overrides)` and `load_run(run_dir, device)` -> a :class:`Run`.

    run = vkd_pyro.train("configs/demo.yaml", out="runs/demo", train__max_epochs=5)  # as `vkd-pyro train`
    run = vkd_pyro.load_run("runs/demo", device="cpu")   # a finished run folder
    prediction = run.predict(["chest.png"], samples=32)   # probabilities and their Monte Carlo spread
    metrics = run.evaluate("test")                        # what metrics.json holds, the same figures
    run.model, run.guide, run.objective                   # the Pyro programs and the objective
"""

from __future__ import annotations

import glob
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from vkd_pyro.classes import CLASSES
from vkd_pyro.config import Config, config_from_dict, load_config
from vkd_pyro.data.decode import MISSING, BadImage, decode_image, to_unit_float
from vkd_pyro.data.prepare import prepare_data
from vkd_pyro.errors import UserError
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.objectives import Objective, objective_for
from vkd_pyro.training.evaluate import evaluate_split, local_predictors, seeded
from vkd_pyro.training.load import load_trained
from vkd_pyro.training.loop import fit
from vkd_pyro.training.memory import check_memory
from vkd_pyro.training.run_folder import default_run_folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")


@dataclass
class Prediction:
    """Per-class probabilities from images alone (Algorithm 2) and their Monte Carlo spread.

    probability[i, c] = 1/S sum_s p(y_c = 1 | x_I^i, z_I^(s)), z_I^(s) ~ p(z_I | x_I^i);
    std[i, c] is the standard deviation of those S values (the spread over prior samples).
    """

    probability: np.ndarray  # (N, C)
    std: np.ndarray  # (N, C)
    classes: tuple
    samples: int
    images: Optional[list] = None  # the file of each row, when predicted from files

    def rows(self) -> list[dict]:
        """One dict per image: {"image", "<class>": probability, "<class> std": spread}."""
        out = []
        for i in range(len(self.probability)):
            row = {"image": self.images[i] if self.images else i}
            for c, name in enumerate(self.classes):
                row[name] = float(self.probability[i, c])
                row[f"{name} std"] = float(self.std[i, c])
            out.append(row)
        return out


@dataclass
class Run:
    """A trained run folder loaded for use from Python (`vkd_pyro.load_run`).

    model, guide: the Pyro programs (`VKDModel`, `EHRPosterior`) for custom inference, e.g.
        `pyro.infer.Predictive(run.model.program, num_samples=S)(features)` or an importance estimate;
    objective: what the run optimised (`vkd_pyro.objectives`);
    predict(images, samples): probabilities from images alone; evaluate(split): what metrics.json holds.
    """

    config: Config
    module: VKDModule
    checkpoint: dict
    device: torch.device
    folder: Path

    @property
    def model(self):
        return self.module.model

    @property
    def guide(self):
        return self.module.guide

    @property
    def objective(self) -> Objective:
        return objective_for(self.config)

    def predict(self, images, samples: Optional[int] = None, batch_size: Optional[int] = None,
                progress: bool = False) -> Prediction:
        """Algorithm 2 for `images`: file paths (files, folders, glob patterns; any format the training
        decoder reads, multi-page files refused as in training), or a float tensor or numpy array
        (converted with torch.from_numpy, same rules) of shape (B, 1, H, W) or (B, H, W), B >= 1, with
        values in [0, 1] at the run's image size (H = W = data.image_size). `samples` (S; None: the
        run's test_samples) and `batch_size` (None: its eval_batch_size) are positive integers.

        Anything else is refused in one line (UserError) naming the problem: integer or boolean images
        (scale them to [0, 1] floats, e.g. x.float() / 255), values outside [0, 1], NaN or infinite,
        another size, an empty batch, a wrong number of dimensions or channels; and so is a batch whose
        images and samples would not fit in the memory available (vkd_pyro.training.memory)."""
        samples_key = "samples" if samples is not None else "inference.test_samples"
        batch_key = "batch_size" if batch_size is not None else "train.eval_batch_size"
        samples = _positive_int("samples", samples, self.config.inference.test_samples)
        batch_size = _positive_int("batch_size", batch_size, self.config.train.eval_batch_size)
        if self.objective.predicts_from != "images":
            raise UserError(f"{self.folder}: a {self.config.inference.objective} run predicts from reports, not "
                            "images (its test figures are in metrics.json; Run.evaluate recomputes them)")
        size = self.config.data.image_size
        if torch.is_tensor(images) or isinstance(images, np.ndarray):
            paths, tensor = None, _image_batch(images, size)
            total = len(tensor)
            chunks = (tensor[i:i + batch_size] for i in range(0, total, batch_size))
        else:
            paths = expand_image_paths([images] if isinstance(images, (str, Path)) else list(images))
            if not paths:
                raise UserError("images: an empty list; predict takes image files, folders or glob patterns")
            total = len(paths)
            chunks = (load_images(paths[i:i + batch_size], size) for i in range(0, total, batch_size))
        check_memory(self.config, min(batch_size, total), samples, self.device, batch_key, samples_key)
        means, stds = [], []
        self.module.eval()
        with tqdm(total=total, desc="predict", unit="image", disable=not progress, file=sys.stderr) as bar:
            for chunk in chunks:
                probs = self.module.predict(chunk.to(self.device, torch.float32), samples)
                means.append(probs.mean(0).cpu())
                stds.append(probs.std(0, unbiased=False).cpu())
                bar.update(len(chunk))
        return Prediction(torch.cat(means).numpy(), torch.cat(stds).numpy(), tuple(CLASSES), samples,
                          [str(p) for p in paths] if paths is not None else None)

    def evaluate(self, split: str = "test", samples: Optional[int] = None, seed: Optional[int] = None) -> dict:
        """What metrics.json holds for `split`, computed now on this run's dataset (nothing is written):
        per-class, macro and micro AUC from images alone (Algorithm 2), and for runs with a teacher
        q(y|z_T) the `teacher` block (for an objective without an image side, the main figures).

        The Monte Carlo draws are seeded by `seed`, the run's seed by default, as training seeds its
        test report: the run's split and S give metrics.json's figures exactly (on the device it was
        trained on; another seed gives fresh draws)."""
        samples_key = "samples" if samples else "inference.test_samples"
        samples = samples or self.config.inference.test_samples
        objective = self.objective
        data = prepare_data(self.config, with_reports=objective.evaluation_reads_reports, device=self.device)
        if split not in data.splits:
            raise UserError(f"split {split!r}: not one of {', '.join(data.splits)}")
        check_memory(self.config, min(self.config.train.eval_batch_size, len(data.splits[split])), samples,
                     self.device, "train.eval_batch_size", samples_key)
        extra = {"best_epoch": self.checkpoint.get("epoch"), "val_macro_auc": self.checkpoint.get("val_macro_auc")}
        predictors = local_predictors(self.module, self.config, samples, self.device)
        with seeded(self.config.seed if seed is None else seed, self.device):
            metrics, _, _ = evaluate_split(objective, data.splits[split], split, samples, *predictors, extra)
        return metrics


def train(config, out=None, overwrite: bool = False, progress: Optional[bool] = False, **overrides) -> Run:
    """Train a run as `vkd-pyro train --config FILE --out DIR key=value ...` does and return it loaded.

    `config`: a YAML file's path or a mapping of sections (as a config file holds); `overrides`:
    dotted keys with `__` for the dots (`train__max_epochs=5`, `inference__objective="no_mi"`);
    `out`: the run folder (default runs/<config>-<objective>-seed<seed>-<hash>, as the CLI). The
    folder's rules are the CLI's (`overwrite` moves another run's files aside). Returns
    `load_run(out)` on the config's device, with the run's code trusted (it was just trained).
    """
    texts = [f"{key.replace('__', '.')}={value}" for key, value in overrides.items()]
    if isinstance(config, dict):
        resolved, name = config_from_dict(config, "config", texts), "config"
    else:
        resolved, name = load_config(config, texts), config
    folder = Path(out) if out is not None else default_run_folder(name, resolved)
    fit(resolved, folder, progress=progress, overwrite=overwrite)
    return load_run(folder, device=resolved.device, trust_code=True)


def load_run(run_dir, device: str = "cpu", trust_code: bool = False) -> Run:
    """The run in folder `run_dir` (config.yaml + checkpoint.pt) on `device` (cpu, cuda or auto), in
    eval mode. A run trained on a GPU loads on a CPU: the weights are read to the CPU first.

    One-line UserError when the weights and the config are not the same run's, or another process
    is training it now (vkd_pyro.training.run_folder.check_loadable), and when config.yaml names a
    prior, guide or objective by an import path and `trust_code` is False (its module is not imported).
    """
    config, module, checkpoint = load_trained(run_dir, device, trust_code)
    return Run(config, module, checkpoint, next(module.parameters()).device, Path(run_dir))


def expand_image_paths(items: Sequence) -> list[str]:
    """Files as given; a folder -> its image files (sorted, not recursive); a glob pattern -> its
    matches (sorted). UserError, naming the item, when something names no image."""
    paths: list[str] = []
    for item in items:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise UserError(f"{item}: folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif path.exists():
            paths.append(item)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item) if Path(p).is_file())
            if not found:
                raise UserError(f"{item}: no file matches the pattern")
            paths += found
        else:
            raise UserError(f"{item}: image not found")
    return paths


def load_images(paths: Sequence[str], size: int) -> torch.Tensor:
    """The image files at `paths` as a batch (B, 1, size, size) float32 in [0, 1], decoded exactly as
    training decodes them (`vkd_pyro.data.decode.decode_image`, then `to_unit_float`). A file that
    cannot be used is a one-line UserError naming it and the reason."""
    batch = []
    for path in paths:
        try:
            grey = decode_image(path, size)
        except BadImage as exc:
            if exc.reason == MISSING:
                raise UserError(f"{path}: image not found") from None
            detail = " ".join(exc.detail.split())[:200]
            raise UserError(f"{path}: {exc.reason}{f' ({detail})' if detail else ''}") from None
        batch.append(torch.from_numpy(to_unit_float(grey)))
    return torch.stack(batch).unsqueeze(1)


def _positive_int(name: str, value, default: int) -> int:
    """`value` as an int >= 1 (None: `default`); a one-line UserError naming `name` for anything else
    (0, -3, 2.5, True)."""
    if value is None:
        return int(default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name}: must be a positive integer, got {value!r}")
    return int(value)


def _float_tensor(images) -> torch.Tensor:
    """`images`, a tensor or a numpy array (torch.from_numpy), as a floating-point tensor; UserError for
    integer or boolean images (to be scaled to [0, 1]) and for complex or non-numeric ones."""
    if isinstance(images, np.ndarray):
        if images.dtype.kind in "biu":
            raise UserError(f"images: a numpy {images.dtype} array; scale it to [0, 1] floats, "
                            "e.g. x.astype(np.float32) / 255")
        if images.dtype.kind != "f":
            raise UserError(f"images: a numpy {images.dtype} array; predict takes float images in [0, 1]")
        return torch.from_numpy(images.astype(images.dtype.newbyteorder("="), order="C", copy=False))
    if images.is_complex():
        raise UserError(f"images: a {images.dtype} tensor; predict takes real float images in [0, 1]")
    if not images.is_floating_point():
        raise UserError(f"images: a {images.dtype} tensor; scale it to [0, 1] floats, e.g. x.float() / 255")
    return images


def _check_unit_range(images: torch.Tensor) -> None:
    """A one-line UserError counting the values of `images` that are NaN, infinite or outside [0, 1]."""
    nan, inf = int(torch.isnan(images).sum()), int(torch.isinf(images).sum())
    if nan or inf:
        raise UserError(f"images: {nan} NaN and {inf} infinite values; predict takes floats in [0, 1]")
    outside = int(((images < 0) | (images > 1)).sum())
    if outside:
        raise UserError(f"images: {outside} of {images.numel()} values outside [0, 1] (from "
                        f"{float(images.min()):.4g} to {float(images.max()):.4g}); scale them to [0, 1], "
                        "e.g. 8-bit values / 255")


def _image_batch(images, size: int) -> torch.Tensor:
    """A tensor or numpy array of images as `Run.predict` takes them, (B, 1, size, size) or
    (B, size, size) floats in [0, 1] with B >= 1, as a (B, 1, size, size) tensor; otherwise a one-line
    UserError naming the problem."""
    tensor = _float_tensor(images)
    shape = tuple(tensor.shape)
    if tensor.dim() not in (3, 4):
        one = " (one image: x[None])" if tensor.dim() == 2 else ""
        raise UserError(f"images: shape {shape}; predict takes a batch (B, 1, H, W) or (B, H, W){one}")
    tensor = tensor.unsqueeze(1) if tensor.dim() == 3 else tensor
    if len(tensor) == 0:
        raise UserError(f"images: an empty batch, shape {shape}")
    if tensor.shape[1] != 1:
        raise UserError(f"images: shape {shape}, {tensor.shape[1]} channels; predict takes grey images "
                        "(B, 1, H, W)")
    if tuple(tensor.shape[2:]) != (size, size):
        raise UserError(f"images: {tensor.shape[2]} x {tensor.shape[3]} pixels; this run takes {size} x {size} "
                        "(its data.image_size)")
    _check_unit_range(tensor)
    return tensor
