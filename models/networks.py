"""The small networks of the probabilistic core: they map features to tensors, never to distributions.

The families (`vkd_pyro.models.families`) hold one of these as a member and build the distribution
from its output, as Pyro's `examples/cvae` does. Every MLP is the paper's (Sec. 4.2): hidden layers
Linear -> ReLU -> Dropout(p), and a last Linear layer (the one that generates the parameters of z)
without dropout.
"""

from __future__ import annotations

from typing import Sequence

import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from torch import nn

MIN_SCALE = 1e-4  # scales and variances are softplus(.) + MIN_SCALE > 0


def positive(raw: torch.Tensor) -> torch.Tensor:
    """softplus(raw) + MIN_SCALE: a scale or variance bounded away from 0."""
    return F.softplus(raw) + MIN_SCALE


class MLP(nn.Module):
    """x (B, in_features) -> head(body(x)) (B, out_features).

    body: Linear -> ReLU -> Dropout(dropout) for each size in `hidden`; head: one Linear, no dropout.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


FLOW_TRANSFORMS = ("affine_autoregressive", "affine_coupling", "spline")


class ConditionalFlow(nn.Module):
    """`layers` conditional bijections f_1 .. f_K of Pyro, each f_k(.; c) conditioned on a context c.

    transform (the cost of one layer, D = z_dim):
    - affine_autoregressive: y = mu(x_<i, c) + sigma(x_<i, c) * x (inverse autoregressive flow, a
      masked MLP of `hidden` sizes, each widened to >= D). Sampling and log q at one's own samples
      (cached) take one pass; log q at any other point needs D sequential passes: a guide's flow.
    - affine_coupling: the second half of x is scaled and shifted by an MLP of the first half and c;
      one pass either way. Successive layers reverse the order of the dimensions in between.
    - spline: an elementwise monotonic rational-linear spline (8 bins on [-3, 3], identity outside)
      whose knots an MLP of c gives; one pass either way, no mixing of dimensions.
    """

    def __init__(self, transform: str, z_dim: int, context_dim: int, hidden: Sequence[int], layers: int = 2):
        super().__init__()
        if transform not in FLOW_TRANSFORMS:
            raise ValueError(f"transform must be one of {', '.join(FLOW_TRANSFORMS)}, got {transform!r}")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        if transform == "affine_coupling" and z_dim < 2:
            raise ValueError("an affine coupling layer needs z_dim >= 2")
        hidden = list(hidden) or [max(z_dim, context_dim)]
        make = {"affine_autoregressive": T.conditional_affine_autoregressive,
                "affine_coupling": T.conditional_affine_coupling,
                "spline": T.conditional_spline}[transform]
        if transform == "affine_autoregressive":
            hidden = [max(h, z_dim) for h in hidden]  # a masked MLP needs >= D units a layer
        self.transforms = nn.ModuleList(make(z_dim, context_dim, hidden_dims=hidden) for _ in range(layers))
        self.reverse = transform == "affine_coupling"
        self.register_buffer("reversal", torch.arange(z_dim - 1, -1, -1), persistent=False)

    def condition(self, context: torch.Tensor) -> list:
        """[f_1(.; c), (reverse), f_2(.; c), ...]: the transforms for a batch of contexts c (B, C)."""
        out = []
        for k, transform in enumerate(self.transforms):
            if k and self.reverse:
                out.append(T.Permute(self.reversal))
            out.append(transform.condition(context))
        return out
