"""Closed-form KL divergences that Pyro and torch do not register, registered here.

Between a diagonal Normal (`Normal(loc, scale).to_event(1)`: the diagonal and standard-Normal
families) and a low-rank multivariate Normal, either way round: the diagonal Normal is the low-rank
Normal N(loc, 0 0^T + diag scale^2) (a zero factor of rank 1), and torch has the closed form between
two low-rank Normals,

    KL(q || p) = 1/2 [ tr(S_p^-1 S_q) + (m_p - m_q)^T S_p^-1 (m_p - m_q) - D + log det S_p - log det S_q ].

Importing this module registers them (the objective and the families import it).
"""

from __future__ import annotations

from torch.distributions import Independent, LowRankMultivariateNormal, Normal, kl_divergence, register_kl


def as_low_rank(d: Independent) -> LowRankMultivariateNormal:
    """N(loc, diag scale^2) as a LowRankMultivariateNormal with a zero covariance factor."""
    if not (isinstance(d.base_dist, Normal) and d.reinterpreted_batch_ndims == 1):
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
