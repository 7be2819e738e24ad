"""KL annealing: the weight beta_t on the KL term of Eq. 8.

Cyclical annealing (Fu et al. 2019), the paper's Eq. 9, with t = 1..T the iteration within the
epoch, T the iterations per epoch and C cycles per epoch:

    tau_t  = mod(t - 1, ceil(T / C)) / (T / C)
    beta_t = g(tau_t) if tau_t <= R else 1,      g(tau) = tau / R  (linear, g(0) = 0, g(R) = 1)
"""

from __future__ import annotations

import math

from pyro import poutine

from vkd_pyro.config import AnnealingConfig


def kl_weighted(beta: float):
    """The handler that weights site "z" by beta in model and guide: beta * (log p - log q).

    `poutine.scale` for beta > 0; at beta = 0 (the start of each cycle of Eq. 9), where Pyro's
    scale refuses 0, `poutine.mask(mask=False)`: the site still draws z (and the MI term still sees
    it) but contributes nothing to the ELBO, which is exactly the weight 0.
    """
    if beta < 0:
        raise ValueError(f"the KL weight must be >= 0, got {beta}")
    return poutine.scale(scale=beta) if beta > 0 else poutine.mask(mask=False)


def cyclical_beta(t: int, T: int, C: int = 4, R: float = 0.5) -> float:
    """Eq. 9 for iteration t (1-based) of T per epoch, C cycles, annealing fraction R."""
    if t < 1 or T < 1:
        raise ValueError("iterations are counted from 1")
    period = T / C
    tau = ((t - 1) % math.ceil(period)) / period
    return tau / R if tau <= R else 1.0


class KLSchedule:
    """beta for the t-th iteration of an epoch of T iterations, as the config says."""

    def __init__(self, config: AnnealingConfig, iterations_per_epoch: int):
        self.config = config
        self.T = iterations_per_epoch

    def __call__(self, t: int) -> float:
        if self.config.schedule == "constant":
            return self.config.beta
        return cyclical_beta(t, self.T, self.config.C, self.config.R)
