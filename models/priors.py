"""Conditional priors p(z_I | x_I): the families a config names with `model.prior`.

Each is an `nn.Module` built as Family(in_features, z_dim, hidden, dropout, **options) whose
forward(features (B, F)) returns a Pyro distribution with batch shape (B,) and event shape (z_dim,):
the interface of `vkd_pyro.families`. `VKDModel` calls it on the image features; the M prior draws
of Eq. 8's classification term use `rsample` when the distribution has one (`has_rsample`), else
the estimator of `vkd_pyro.prior_draws` (the mixture).

A new prior is a module like these, anywhere importable, named in the config as
`model.prior: package.module:Name` (with `model.prior_options` for its keyword options).
"""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from vkd_pyro.networks import DiagonalNormalFamily, FlowFamily, LowRankNormalFamily, MixtureGaussianMLP


class DiagonalNormalPrior(DiagonalNormalFamily):
    """p(z_I | x_I) = N(loc(x_I), diag scale(x_I)^2): the paper's prior (Sec. 3.5)."""


class LowRankNormalPrior(LowRankNormalFamily):
    """p(z_I | x_I) = N(loc(x_I), W(x_I) W(x_I)^T + diag d(x_I)), W of shape (z_dim, rank).

    Correlated latent dimensions at O(z_dim rank^2) cost. Closed-form KL against itself, the diagonal
    and the standard Normal (Pyro's and `vkd_pyro.kl`'s registrations).
    """


class MixtureNormalPrior(MixtureGaussianMLP):
    """p(z_I | x_I) = sum_k w_k(x_I) N(loc_k(x_I), diag scale_k(x_I)^2), K = `components`.

    A `MixtureSameFamily`: no `rsample` (has_rsample is False) and no closed-form KL. Its M draws in
    the classification term pick a component k ~ Categorical(w) and reparameterise within it,
    z = loc_k + scale_k * eps, and add a score-function term grad log w_k for the mixing weights:
    an unbiased gradient (see `vkd_pyro.prior_draws`). The KL term is Monte Carlo (log q - log p).
    """

    def __init__(self, in_features: int, z_dim: int, hidden: Sequence[int] = (512, 512), dropout: float = 0.5,
                 components: int = 4):
        super().__init__(in_features, hidden, z_dim, components, dropout)

    def forward(self, features: torch.Tensor) -> dist.Distribution:
        logits, loc, scale = super().forward(features)
        return dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))


class FlowPrior(FlowFamily):
    """p(z_I | x_I): z = f_K(... f_1(z_0; x_I) ...; x_I), z_0 ~ N(loc(x_I), diag scale(x_I)^2).

    log p(z | x_I) = log N(z_0; loc, scale) - sum_k log |det d f_k / d z_{k-1}|, with the
    conditional bijections f_k of `vkd_pyro.networks.ConditionalFlow` (`transform`, `layers`),
    conditioned on the image features. The model both samples it (M draws) and scores the guide's z
    under it, so the default is affine_coupling (one pass either way); affine_autoregressive scores
    a foreign z in z_dim sequential passes (small z_dim only). The KL term is Monte Carlo.
    """

    def __init__(self, in_features: int, z_dim: int, hidden: Sequence[int] = (512, 512), dropout: float = 0.5,
                 transform: str = "affine_coupling", layers: int = 2):
        super().__init__(in_features, z_dim, hidden, dropout, transform, layers)


class StandardNormalPrior(nn.Module):
    """p(z_I | x_I) = N(0, I), whatever the image: the unconditional baseline (no parameters).

    The classifier still sees the image features; only the latent code ignores them.
    """

    def __init__(self, in_features: int, z_dim: int, hidden: Sequence[int] = (), dropout: float = 0.0):
        super().__init__()
        self.z_dim = z_dim

    def forward(self, features: torch.Tensor) -> dist.Distribution:
        zeros = features.new_zeros(features.shape[:-1] + (self.z_dim,))
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)
