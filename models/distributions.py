"""Distributions of the probabilistic core beyond Pyro's own, and the closed-form KLs it registers.

1. :class:`BroadcastNormal`, a diagonal Normal whose log density is evaluated on its unbroadcast
   parameters. With L vectorised particles (`Trace_ELBO(vectorize_particles=True)`), Pyro
   broadcasts every site's distribution to batch shape (L, B) with `fn.expand(...)`. torch's
   `Normal.expand` gives parameter views of that shape (no copy), but `Normal.log_prob` then
   computes scale^2 and log(scale) over all L x B x D elements although they are the same for each
   particle. `BroadcastNormal` is that Normal (the same class for every KL registration, the same
   draws) whose expansions remember the parameters they were expanded from; its log density

       log N(z | mu, sigma^2) = -(z - mu)^2 / (2 sigma^2) - log sigma - log sqrt(2 pi)

   evaluates sigma^2 and log sigma on those (B, D) parameters and broadcasts against the (L, B, D)
   value (tests/test_distributions.py checks values and gradients, benchmarks/bench_svi.py times both).

2. KL divergences that Pyro and torch do not register, between a diagonal Normal
   (`Normal(loc, scale).to_event(1)`) and a low-rank multivariate Normal, either way round: the
   diagonal Normal is the low-rank Normal N(loc, 0 0^T + diag scale^2) (a zero factor of rank 1),
   and torch has the closed form between two low-rank Normals,

       KL(q || p) = 1/2 [ tr(S_p^-1 S_q) + (m_p - m_q)^T S_p^-1 (m_p - m_q) - D + log det S_p - log det S_q ].

   Importing this module registers them (the families import it).
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import Normal
from torch.distributions import Independent, LowRankMultivariateNormal, kl_divergence, register_kl
from torch.distributions import Normal as TorchNormal

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class BroadcastNormal(Normal):
    """`pyro.distributions.Normal` whose expansions compute log densities on the unexpanded loc and scale."""

    def expand(self, batch_shape, _instance=None):
        new = super().expand(batch_shape, _instance)
        new._unexpanded = self.unexpanded()
        return new

    def unexpanded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) as the distribution was built, before any `expand`."""
        return getattr(self, "_unexpanded", (self.loc, self.scale))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        loc, scale = self.unexpanded()
        # three new tensors of the value's size (then in place); the rest is of the parameters' size
        log_prob = ((value - loc) * scale.reciprocal()).square()
        log_prob = log_prob.mul_(-0.5).sub_(scale.log() + HALF_LOG_2PI)
        batch = self.batch_shape
        if log_prob.shape[max(0, log_prob.dim() - len(batch)):] != batch:  # a value smaller than the batch
            log_prob = log_prob.expand(torch.broadcast_shapes(log_prob.shape, batch))
        return log_prob


def as_low_rank(d: Independent) -> LowRankMultivariateNormal:
    """N(loc, diag scale^2) as a LowRankMultivariateNormal with a zero covariance factor."""
    if not (isinstance(d.base_dist, TorchNormal) and d.reinterpreted_batch_ndims == 1):
        raise NotImplementedError
    loc, scale = d.base_dist.loc, d.base_dist.scale
    loc = loc.expand(d.batch_shape + d.event_shape)
    return LowRankMultivariateNormal(loc, loc.new_zeros(loc.shape + (1,)), scale.expand(loc.shape) ** 2)


@register_kl(Independent, LowRankMultivariateNormal)
def _kl_diagonal_low_rank(q, p):
    return kl_divergence(as_low_rank(q), p)


@register_kl(LowRankMultivariateNormal, Independent)
def _kl_low_rank_diagonal(q, p):
    return kl_divergence(q, as_low_rank(p))
