"""Reading a run folder back: its resolved config, its best checkpoint, and images to predict on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from vkd_pyro.build import build_module
from vkd_pyro.checkpoint import load_checkpoint
from vkd_pyro.config import Config, load_config
from vkd_pyro.errors import UserError
from vkd_pyro.module import VKDModule


@dataclass
class Run:
    config: Config
    module: VKDModule
    checkpoint: dict
    device: torch.device


def load_run(run_dir: str) -> Run:
    """The module of a run folder (config.yaml + checkpoint.pt), on the run's device, in eval mode."""
    from vkd_pyro.train import resolve_device

    folder = Path(run_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: run folder not found (train writes one with --out)")
    config = load_config(folder / "config.yaml")
    checkpoint = load_checkpoint(folder / "checkpoint.pt")
    device = resolve_device(config.device)
    module = build_module(config, checkpoint.get("text_dims"))
    try:
        module.load_state_dict(checkpoint["module"])
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"{folder / 'checkpoint.pt'}: does not match {folder / 'config.yaml'} "
                        f"({str(exc).splitlines()[0]})") from None
    module.to(device).eval()
    return Run(config, module, checkpoint, device)


def load_images(paths: Sequence[str], size: int) -> torch.Tensor:
    """The image files at `paths` as a batch (B, 1, size, size) float32 in [0, 1], decoded exactly as
    training decodes them (`vkd_pyro.data.decode.decode_image`, then `to_unit_float`). A file that
    cannot be used is a one-line UserError naming it and the reason."""
    from vkd_pyro.data.decode import MISSING, BadImage, decode_image, to_unit_float

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
