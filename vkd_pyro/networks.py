"""Neural networks shared by the Pyro models and guides: the amortised parameters of p(z|x), q(z|x).

Each network maps a batch of features (B, F) to the parameters of a distribution over z (z_dim
values); the prior families in `models/priors.py` and the posterior families in
`guides/posteriors.py` turn those parameters into Pyro distributions. Every MLP here is the paper's
(Sec. 4.2): hidden layers Linear -> ReLU -> Dropout(p), and a final layer (the one that generates the
parameters of z) without dropout.
"""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from torch import nn

from vkd_pyro.broadcast import BroadcastNormal

MIN_SCALE = 1e-4  # scales and variances are softplus(.) + MIN_SCALE > 0


def hidden_layers(in_features: int, hidden: Sequence[int], dropout: float) -> tuple[nn.Sequential, int]:
    """The MLP body, Linear -> ReLU -> Dropout(p) per size in `hidden`, and its output width."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    return nn.Sequential(*layers), width


def positive(raw: torch.Tensor) -> torch.Tensor:
    """softplus(raw) + MIN_SCALE: a scale or variance bounded away from 0."""
    return F.softplus(raw) + MIN_SCALE


class GaussianMLP(nn.Module):
    """Amortised diagonal Gaussian: x -> (loc, scale), an MLP with hidden sizes `hidden`.

    loc = W_loc h(x) + b_loc, scale = softplus(W_scale h(x) + b_scale) + 1e-4, with h the body and
    one head of 2 z_dim outputs (loc first, then the raw scale).
    """

    def __init__(self, in_features: int, hidden: Sequence[int], z_dim: int, dropout: float = 0.5):
        super().__init__()
        self.body, width = hidden_layers(in_features, hidden, dropout)
        self.head = nn.Linear(width, 2 * z_dim)
        self.z_dim = z_dim

    def loc_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale), each (B, z_dim)."""
        loc, raw_scale = self.head(self.body(x)).split(self.z_dim, dim=-1)
        return loc, positive(raw_scale)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc_scale(x)


class LowRankGaussianMLP(nn.Module):
    """Amortised low-rank-plus-diagonal Gaussian: x -> (loc, cov_factor, cov_diag).

    Covariance W(x) W(x)^T + diag d(x), with W (B, z_dim, rank) and d = softplus(.) + 1e-4 (B, z_dim):
    the parameters of `pyro.distributions.LowRankMultivariateNormal`.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], z_dim: int, rank: int, dropout: float = 0.5):
        super().__init__()
        if not 1 <= rank <= z_dim:
            raise ValueError(f"rank must be in [1, z_dim = {z_dim}], got {rank}")
        self.body, width = hidden_layers(in_features, hidden, dropout)
        self.head = nn.Linear(width, z_dim * (rank + 2))
        self.z_dim, self.rank = z_dim, rank

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.head(self.body(x))
        loc, raw_diag, factor = out.split([self.z_dim, self.z_dim, self.z_dim * self.rank], dim=-1)
        return loc, factor.unflatten(-1, (self.z_dim, self.rank)), positive(raw_diag)


class MixtureGaussianMLP(nn.Module):
    """Amortised mixture of K diagonal Gaussians: x -> (logits (B, K), loc (B, K, z_dim), scale (B, K, z_dim)).

    Mixing weights w_k(x) = softmax(logits)_k; component k is N(loc_k(x), diag scale_k(x)^2).
    """

    def __init__(self, in_features: int, hidden: Sequence[int], z_dim: int, components: int, dropout: float = 0.5):
        super().__init__()
        if components < 1:
            raise ValueError(f"components must be >= 1, got {components}")
        self.body, width = hidden_layers(in_features, hidden, dropout)
        self.head = nn.Linear(width, components * (1 + 2 * z_dim))
        self.z_dim, self.components = z_dim, components

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        K, D = self.components, self.z_dim
        logits, loc, raw_scale = self.head(self.body(x)).split([K, K * D, K * D], dim=-1)
        return logits, loc.unflatten(-1, (K, D)), positive(raw_scale.unflatten(-1, (K, D)))


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


class DiagonalNormalFamily(GaussianMLP):
    """features -> N(loc(features), diag scale(features)^2), event shape (z_dim,): the paper's
    conditional Gaussian, as prior p(z_I|x_I) and as posterior q(z_T|x_T) (`vkd_pyro.families`).

    The Normal is a :class:`~vkd_pyro.broadcast.BroadcastNormal`: Pyro's Normal, whose broadcast over
    the L vectorised particles is lazy (the same values and draws, without L copies of loc and scale).
    """

    def __init__(self, in_features: int, z_dim: int, hidden: Sequence[int] = (512, 512), dropout: float = 0.5):
        super().__init__(in_features, hidden, z_dim, dropout)

    def forward(self, features: torch.Tensor):
        loc, scale = self.loc_scale(features)
        return BroadcastNormal(loc, scale).to_event(1)


class LowRankNormalFamily(LowRankGaussianMLP):
    """features -> N(loc, W W^T + diag d), W of shape (z_dim, rank), all functions of the features."""

    def __init__(self, in_features: int, z_dim: int, hidden: Sequence[int] = (512, 512), dropout: float = 0.5,
                 rank: int = 8):
        super().__init__(in_features, hidden, z_dim, rank, dropout)

    def forward(self, features: torch.Tensor):
        loc, cov_factor, cov_diag = super().forward(features)
        return dist.LowRankMultivariateNormal(loc, cov_factor, cov_diag)


class FlowFamily(nn.Module):
    """features -> z = f_K(... f_1(z_0; x) ...; x), z_0 ~ N(loc(x), diag scale(x)^2), x the features.

    log density: log N(z_0; loc, scale) - sum_k log |det d f_k / d z_{k-1}|, with the conditional
    bijections of :class:`ConditionalFlow` (`transform`, `layers`) conditioned on the features.
    """

    def __init__(self, in_features: int, z_dim: int, hidden: Sequence[int] = (512, 512), dropout: float = 0.5,
                 transform: str = "affine_coupling", layers: int = 2):
        super().__init__()
        self.base = GaussianMLP(in_features, hidden, z_dim, dropout)
        self.flow = ConditionalFlow(transform, z_dim, in_features, hidden, layers)

    def forward(self, features: torch.Tensor):
        loc, scale = self.base.loc_scale(features)
        return dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), self.flow.condition(features))
