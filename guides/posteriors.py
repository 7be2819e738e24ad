"""Variational posteriors q(z_T | x_T) on report features: the families a config names with `model.guide`.

The same interface as the priors (`vkd_pyro.families`): Family(in_features, z_dim, hidden, dropout,
**options), forward(features (B, F)) -> a Pyro distribution, batch shape (B,), event (z_dim,).
`EHRPosterior` calls it on the pooled output of the trainable text block. A guide's distribution
should have `rsample` (all of these do): Trace_ELBO would otherwise fall back on score-function
gradients for site "z", and the meanfield estimators refuse it.

A new guide is a module like these, anywhere importable, named as `model.guide: package.module:Name`.
"""

from __future__ import annotations

from typing import Sequence

from vkd_pyro.networks import DiagonalNormalFamily, FlowFamily, LowRankNormalFamily


class DiagonalNormalPosterior(DiagonalNormalFamily):
    """q(z_T | x_T) = N(loc(x_T), diag scale(x_T)^2): the paper's posterior (Sec. 3.5)."""


class LowRankNormalPosterior(LowRankNormalFamily):
    """q(z_T | x_T) = N(loc(x_T), W(x_T) W(x_T)^T + diag d(x_T)), W of shape (z_dim, rank)."""


class FlowPosterior(FlowFamily):
    """q(z_T | x_T): z = f_K(... f_1(z_0; x_T) ...; x_T), z_0 ~ N(loc(x_T), diag scale(x_T)^2).

    log q(z | x_T) = log N(z_0; loc, scale) - sum_k log |det d f_k / d z_{k-1}|. The default
    transform is the inverse autoregressive flow (affine_autoregressive): the guide only scores its
    own samples, which Pyro's transforms cache, so both sampling and log q take one pass. The KL
    term against any prior is Monte Carlo.
    """

    def __init__(self, in_features: int, z_dim: int, hidden: Sequence[int] = (512, 512), dropout: float = 0.5,
                 transform: str = "affine_autoregressive", layers: int = 2):
        super().__init__(in_features, z_dim, hidden, dropout, transform, layers)
