"""The M prior draws z_I^(m) ~ p(z_I | x_I) of Eq. 8's classification term, and their gradient.

The term is E_p[f(z)], f(z) = log p(y | x_I, z), with p = p_theta depending on the prior's
parameters. Its gradient is estimated in one of three ways, by what the prior's distribution offers:

1. `has_rsample` (diagonal, low-rank, flow, standard Normal): z = g_theta(eps), pathwise; the mean
   over M draws of f(z) is differentiated as it is. Nothing else is added.
2. a `MixtureSameFamily` whose components have `rsample` (the mixture prior): the component
   k ~ Categorical(w_theta) cannot be reparameterised, z = component k's rsample can. Then

       grad E_p[f] = E_{k, eps}[ grad f(g_theta,k(eps)) + f(z) grad log w_theta,k ]

   pathwise within the component plus a score-function term for the mixing weights: unbiased.
3. anything else: z ~ p without a gradient through z, and the score function f(z) grad log p_theta(z).

Score-function terms enter through a surrogate whose value is the plain Monte Carlo mean (so the
loss Pyro reports does not change) and whose gradient is the estimator above:

    surrogate = 1/M sum_m [ f_m + (f_m - b_m) (s_m - stop_grad(s_m)) ],   (f_m - b_m) held constant

with s_m the log-probability of draw m's non-reparameterised choice (log w_k, or log p(z)) and b_m
the mean of f over the other M - 1 draws (a leave-one-out baseline: independent of draw m, so the
estimator stays unbiased). With M = 1 there is no baseline (b = 0): unbiased, noisier; use
`inference.prior_samples` >= 2 with a mixture prior.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.distributions import Distribution, MixtureSameFamily


def draw(prior: Distribution, num_samples: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(z, score): M draws z (M, B, D) from `prior`, and the log-probability s (M, B) of the part of
    each draw that is not reparameterised (None when all of it is)."""
    if prior.has_rsample:
        return prior.rsample((num_samples,)), None
    if isinstance(prior, MixtureSameFamily) and prior.component_distribution.has_rsample:
        k = prior.mixture_distribution.sample((num_samples,))  # (M, B)
        every = prior.component_distribution.rsample((num_samples,))  # (M, B, K, D)
        index = k[..., None, None].expand(k.shape + (1,) + every.shape[-1:])
        return every.gather(-2, index).squeeze(-2), prior.mixture_distribution.log_prob(k)
    z = prior.sample((num_samples,))
    return z, prior.log_prob(z)


def monte_carlo_mean(values: torch.Tensor, score: Optional[torch.Tensor]) -> torch.Tensor:
    """1/M sum_m f_m over dim 0, with the score-function surrogate above when `score` is given."""
    if score is None:
        return values.mean(0)
    f = values.detach()
    M = values.shape[0]
    baseline = (f.sum(0, keepdim=True) - f) / (M - 1) if M > 1 else torch.zeros_like(f)
    return (values + (f - baseline) * (score - score.detach())).mean(0)
