"""Checkpoints: written atomically (temporary file, then rename), read with weights_only=True."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch

from vkd_pyro.errors import UserError


def save_atomic(obj, path: os.PathLike) -> None:
    """torch.save to a temporary file beside `path`, then os.replace: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: os.PathLike) -> dict:
    """A checkpoint written by `train` (tensors and plain Python values only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found (a run folder written by `vkd-pyro train` holds checkpoint.pt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise UserError(f"{path}: not a readable vkd-pyro checkpoint ({type(exc).__name__})") from None
