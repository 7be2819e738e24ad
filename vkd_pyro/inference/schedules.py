"""KL annealing: the weight beta on the KL term of Eq. 8, as `inference.annealing` chooses it.

Every schedule is built from a ramp g on [0, 1] with g(0) = 0 and g(1) = 1 (`annealing.g`):

    linear:  g(u) = u
    sigmoid: g(u) = (s(k (u - 1/2)) - s(-k/2)) / (s(k/2) - s(-k/2)),  s the logistic, k = 10
             (a logistic S-curve centred at u = 1/2, shifted and rescaled so that g(0) = 0 and
             g(1) = 1 exactly: beta is exactly 0 where a cycle starts)

`annealing.schedule`, with t = 1..T the iteration within an epoch of T iterations and e = 1, 2, ...
the epoch:

- cyclical (Fu et al. 2019, the paper's Eq. 9; C cycles per epoch, annealing fraction R):
      tau_t  = mod(t - 1, ceil(T / C)) / (T / C)
      beta_t = g(tau_t / R) if tau_t <= R else 1          (linear: tau_t / R, the paper's)
- monotonic (Bowman et al. 2016): beta rises once, over the first W = `warmup_epochs` epochs, then
  stays 1. With s = (e - 1) T + t the global iteration (1-based):
      beta_s = g(min(1, (s - 1) / (W T)))                  (0 at the first step, 1 from s = W T + 1)
- constant: beta = `annealing.beta` at every step.
- none: beta = 1 at every step (no annealing: the plain ELBO).

`annealing.beta_max` (default 1) caps the cyclical, monotonic and none schedules by *scaling*:
beta = beta_max * g(...) (none: beta_max), so that Eq. 9 keeps its shape and only its plateau
moves; the constant schedule is `annealing.beta` itself.

`inference.guide_warmup_epochs` = W (default 0): beta = 0 in epochs 1..W, then the schedule runs
as if epoch W + 1 were its first (the monotonic ramp starts there).
"""

from __future__ import annotations

import math
from typing import Optional

SIGMOID_STEEPNESS = 10.0


def linear_ramp(u: float) -> float:
    """g(u) = u."""
    return u


def sigmoid_ramp(u: float, k: float = SIGMOID_STEEPNESS) -> float:
    """g(u) = (s(k (u - 1/2)) - s(-k/2)) / (s(k/2) - s(-k/2)): a logistic with g(0) = 0, g(1) = 1."""
    def s(x):
        return 1.0 / (1.0 + math.exp(-x))

    low, high = s(-k / 2), s(k / 2)
    return (s(k * (u - 0.5)) - low) / (high - low)


RAMPS = {"linear": linear_ramp, "sigmoid": sigmoid_ramp}


def cyclical_beta(t: int, T: int, C: int = 4, R: float = 0.5, g: str = "linear") -> float:
    """Eq. 9 for iteration t (1-based) of T per epoch, C cycles, annealing fraction R, ramp g."""
    if t < 1 or T < 1:
        raise ValueError("iterations are counted from 1")
    period = T / C
    tau = ((t - 1) % math.ceil(period)) / period
    return RAMPS[g](tau / R) if tau <= R else 1.0


def monotonic_beta(step: int, warmup_steps: float, g: str = "linear") -> float:
    """g(min(1, (step - 1) / warmup_steps)) for the global iteration `step` (1-based)."""
    if step < 1:
        raise ValueError("iterations are counted from 1")
    if warmup_steps <= 0:
        raise ValueError(f"the warm-up must be > 0 iterations, got {warmup_steps}")
    return RAMPS[g](min(1.0, (step - 1) / warmup_steps))


class KLSchedule:
    """beta for iteration t (1-based) of epoch `epoch` (1-based), T iterations an epoch, as the config says."""

    def __init__(self, config, iterations_per_epoch: int, warmup_epochs: int = 0):
        """config: the `inference.annealing` section (schedule, R, C, g, beta, warmup_epochs, beta_max);
        warmup_epochs: `inference.guide_warmup_epochs`, epochs at beta = 0 before the schedule starts."""
        self.config = config
        self.T = iterations_per_epoch
        self.warmup_epochs = warmup_epochs

    def warning(self) -> Optional[str]:
        """A line for the user when the schedule never weights the KL term, else None: Eq. 9 with
        T <= C iterations an epoch has ceil(T / C) = 1, so tau = 0 and beta = g(0) = 0 at every step."""
        c = self.config
        if c.schedule == "cyclical" and self.T <= c.C:
            return (f"note: inference.annealing: {self.T} iteration(s) an epoch <= C = {c.C} cycles, so Eq. 9 keeps "
                    f"beta at 0 (no KL term); set inference.annealing.C below {self.T} or use smaller batches")
        return None

    def __call__(self, t: int, epoch: int = 1) -> float:
        c = self.config
        if epoch < 1:
            raise ValueError("epochs are counted from 1")
        if epoch <= self.warmup_epochs:
            return 0.0
        epoch -= self.warmup_epochs
        if c.schedule == "constant":
            return c.beta
        if c.schedule == "none":
            return c.beta_max
        if c.schedule == "monotonic":
            return c.beta_max * monotonic_beta((epoch - 1) * self.T + t, c.warmup_epochs * self.T, c.g)
        return c.beta_max * cyclical_beta(t, self.T, c.C, c.R, c.g)
