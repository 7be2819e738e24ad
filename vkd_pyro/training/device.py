"""The device a config names: `device: auto | cpu | cuda`."""

from __future__ import annotations

import torch

from vkd_pyro.errors import UserError


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when a GPU is visible, else cpu; `cuda` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for but no GPU is visible (use device=auto or device=cpu)")
    return torch.device(name)
