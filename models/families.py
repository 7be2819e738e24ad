"""Conditional families over z: a network (a member) and the distribution it parameterises.

One family serves as the conditional prior p(z_I | x_I) (conditioned on image features) and as the
posterior q(z_T | x_T) (conditioned on pooled report features). The interface, written down here
and nowhere else (:class:`ConditionalFamily`):

    Family(in_features, z_dim, hidden, dropout, **options)      an nn.Module
    family(features (B, F)) -> a Pyro distribution, batch shape (B,), event shape (z_dim,)

`hidden` and `dropout` are the paper's MLP sizes ({512, 512}) and dropout (0.5); a family may use
them or not. A family whose distribution has no `rsample` is allowed: the model's M prior draws then
use the estimator of `vkd_pyro.models.prior_draws`, a guide gets Pyro's score-function gradient under
`elbo: trace`, and the meanfield estimator refuses it. A config names a family by the registered name
of `vkd_pyro.models.PRIORS` / `vkd_pyro.guides.GUIDES` or by an import path `package.module:Name`.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import Distribution

from vkd_pyro.models.distributions import BroadcastNormal
from vkd_pyro.models.networks import MLP, ConditionalFlow, positive


@runtime_checkable
class ConditionalFamily(Protocol):
    """A conditional distribution over z, amortised by a network: what a prior or guide family is.

    Construction: ``Family(in_features, z_dim, hidden, dropout, **options)``, an `nn.Module`:
        in_features  F, the width of the features it conditions on (the image encoder's output for a
                     prior, the pooled text block's output for a guide);
        z_dim        D, the latent size (`model.z_dim`);
        hidden       the MLP sizes (`model.hidden`) and dropout (`model.dropout`) of the paper's
        dropout      networks; a family may use them for its own networks or ignore them;
        **options    `model.prior_options` / `model.guide_options`, keyword arguments only.

    Call: ``family(features)`` with features (B, F) returns a `torch.distributions.Distribution`
    (normally a Pyro one) with batch_shape (B,) and event_shape (D,), whose `log_prob` is
    differentiable in the module's parameters and which supports `sample`, `expand` (Pyro's plates
    and `Predictive`) and, where it can, `rsample` (declared by its `has_rsample`).
    """

    def __init__(self, in_features: int, z_dim: int, hidden: Sequence[int], dropout: float, **options): ...

    def __call__(self, features: torch.Tensor) -> Distribution: ...


class DiagonalNormal(nn.Module):
    """features -> N(loc, diag scale^2): the paper's prior and posterior (Sec. 3.5).

    (loc, raw) = MLP(features) split in two halves of z_dim; scale = softplus(raw) + 1e-4. The
    Normal is a :class:`~vkd_pyro.models.distributions.BroadcastNormal`: Pyro's Normal, whose
    broadcast over the L vectorised particles is lazy (the same values and draws).
    """

    def __init__(self, in_features: int, z_dim: int, hidden: Sequence[int] = (512, 512), dropout: float = 0.5):
        super().__init__()
        self.net = MLP(in_features, hidden, 2 * z_dim, dropout)
        self.z_dim = z_dim

    def loc_scale(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale), each (B, z_dim)."""
        loc, raw_scale = self.net(features).split(self.z_dim, dim=-1)
        return loc, positive(raw_scale)

    def forward(self, features: torch.Tensor) -> Distribution:
        return BroadcastNormal(*self.loc_scale(features)).to_event(1)


class LowRankNormal(nn.Module):
    """features -> N(loc, W W^T + diag d), W of shape (z_dim, rank), d = softplus(.) + 1e-4.

    Correlated latent dimensions at O(z_dim rank^2) cost; closed-form KL against itself, the diagonal
    and the standard Normal (Pyro's and `vkd_pyro.models.distributions`' registrations).
    """

    def __init__(self, in_features: int, z_dim: int, hidden: Sequence[int] = (512, 512), dropout: float = 0.5,
                 rank: int = 8):
        super().__init__()
        if not 1 <= rank <= z_dim:
            raise ValueError(f"rank must be in [1, z_dim = {z_dim}], got {rank}")
        self.net = MLP(in_features, hidden, z_dim * (rank + 2), dropout)
        self.z_dim, self.rank = z_dim, rank

    def forward(self, features: torch.Tensor) -> Distribution:
        D, r = self.z_dim, self.rank
        loc, raw_diag, factor = self.net(features).split([D, D, D * r], dim=-1)
        return dist.LowRankMultivariateNormal(loc, factor.unflatten(-1, (D, r)), positive(raw_diag))


class MixtureNormal(nn.Module):
    """features -> sum_k w_k N(loc_k, diag scale_k^2), K = `components`, w = softmax(logits).

    A `MixtureSameFamily`: no `rsample` and no closed-form KL. As a prior, its M draws in the
    classification term pick k ~ Categorical(w) and reparameterise within the component, with a
    score-function term for the weights (`vkd_pyro.models.prior_draws`); the KL term is Monte Carlo.
    """

    def __init__(self, in_features: int, z_dim: int, hidden: Sequence[int] = (512, 512), dropout: float = 0.5,
                 components: int = 4):
        super().__init__()
        if components < 1:
            raise ValueError(f"components must be >= 1, got {components}")
        self.net = MLP(in_features, hidden, components * (1 + 2 * z_dim), dropout)
        self.z_dim, self.components = z_dim, components

    def forward(self, features: torch.Tensor) -> Distribution:
        K, D = self.components, self.z_dim
        logits, loc, raw_scale = self.net(features).split([K, K * D, K * D], dim=-1)
        components = dist.Normal(loc.unflatten(-1, (K, D)), positive(raw_scale.unflatten(-1, (K, D))))
        return dist.MixtureSameFamily(dist.Categorical(logits=logits), components.to_event(1))


class Flow(nn.Module):
    """features x -> z = f_K(... f_1(z_0; x) ...; x), z_0 ~ N(loc(x), diag scale(x)^2).

    log density: log N(z_0; loc, scale) - sum_k log |det d f_k / d z_{k-1}|, with the conditional
    bijections of :class:`~vkd_pyro.models.networks.ConditionalFlow` (`transform`, `layers`)
    conditioned on the features. A prior both samples (M draws) and scores the guide's z: its default
    is affine_coupling (one pass either way). A guide only scores its own (cached) samples: the
    registered `flow` guide uses the inverse autoregressive affine_autoregressive. KL is Monte Carlo.
    """

    def __init__(self, in_features: int, z_dim: int, hidden: Sequence[int] = (512, 512), dropout: float = 0.5,
                 transform: str = "affine_coupling", layers: int = 2):
        super().__init__()
        self.base = DiagonalNormal(in_features, z_dim, hidden, dropout)
        self.flow = ConditionalFlow(transform, z_dim, in_features, hidden, layers)

    def forward(self, features: torch.Tensor) -> Distribution:
        loc, scale = self.base.loc_scale(features)
        return dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), self.flow.condition(features))


class StandardNormal(nn.Module):
    """features -> N(0, I), whatever they are: the unconditional baseline (no parameters).

    As a prior the classifier still sees the image features; only the latent code ignores them.
    """

    def __init__(self, in_features: int, z_dim: int, hidden: Sequence[int] = (), dropout: float = 0.0):
        super().__init__()
        self.z_dim = z_dim

    def forward(self, features: torch.Tensor) -> Distribution:
        zeros = features.new_zeros(features.shape[:-1] + (self.z_dim,))
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)
