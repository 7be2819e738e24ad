"""A diagonal Normal that Pyro's particle plate broadcasts lazily, and the KL that goes with it.

With L vectorised particles (`Trace_ELBO(vectorize_particles=True)`), Pyro broadcasts every
site's distribution to batch shape (L, B) with `fn.expand(...)`. torch's `Normal.expand`
materialises that as expanded parameter views, and every density then recomputes scale^2 and
log(scale) over all L x B x D elements although they are the same for each particle.
:class:`BroadcastNormal` expands to Pyro's :class:`ExpandedDistribution` instead: its log density
evaluates the base Normal (parameters (B, D)) at the (L, B, D) value by broadcasting, and its draws
are the same standard Normal numbers in the same order as the eager expansion's. The values are
those of `pyro.distributions.Normal`; only the work differs (benchmarks/bench_svi.py shows both).

KL(q || p) between two ExpandedDistributions of the same batch shape is the KL of their bases,
broadcast (registered here, so that `TraceMeanField_ELBO` and the term recorder keep their closed
form for such pairs).
"""

from __future__ import annotations

import torch
from pyro.distributions import Normal
from pyro.distributions.torch_distribution import ExpandedDistribution
from torch.distributions import kl_divergence, register_kl


class BroadcastNormal(Normal):
    """`pyro.distributions.Normal` whose `expand` is lazy (an ExpandedDistribution of itself)."""

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        return ExpandedDistribution(self, batch_shape)


@register_kl(ExpandedDistribution, ExpandedDistribution)
def _kl_expanded_expanded(q: ExpandedDistribution, p: ExpandedDistribution) -> torch.Tensor:
    """KL of the bases, broadcast to the common batch shape (each expanded element is a copy)."""
    if q.batch_shape != p.batch_shape:
        raise NotImplementedError
    return kl_divergence(q.base_dist, p.base_dist).expand(q.batch_shape)
