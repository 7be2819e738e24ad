"""Neural networks shared by the Pyro models and guides."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class GaussianMLP(nn.Module):
    """Amortised diagonal Gaussian: x -> (loc, scale), an MLP with hidden sizes `hidden`.

    Each hidden layer is Linear -> ReLU -> Dropout(p); the final layer (the one that generates the
    parameters of z) has no dropout, as in the paper (Sec. 4.2). scale = softplus(.) + 1e-4 > 0.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], z_dim: int, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2 * z_dim)
        self.z_dim = z_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw_scale = self.head(self.body(x)).split(self.z_dim, dim=-1)
        return loc, F.softplus(raw_scale) + 1e-4
