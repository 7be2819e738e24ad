"""Shared pieces of the benchmarks: the paper-sized networks on cached features, batches, a timer.

"Cached features" (DESIGN.md): the image encoder is the identity on 1024-d DenseNet-121 features
and the text side is one pooled 384-d vector per report, so that a step times the probabilistic
part of VKD (prior and posterior MLPs {512, 512}, z of 512, both classifiers, the ELBO) alone.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import torch
from pyro.distributions import Normal
from torch import nn

from vkd_pyro.classes import NUM_CLASSES
from vkd_pyro.data.batching import Batch
from vkd_pyro.guides import EHRPosterior
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.models import VKDModel
from vkd_pyro.models.families import DiagonalNormal

BATCH, IMAGE_FEATURES, TEXT_FEATURES, Z, HIDDEN = 64, 1024, 384, 512, [512, 512]


class CachedImageFeatures(nn.Module):
    """The identity 'image encoder': its input already is the (B, 1024) feature vector."""

    out_features = IMAGE_FEATURES

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class PooledText(nn.Module):
    """The 'text head' of cached features: the first (only) token state is the pooled report vector."""

    out_features = TEXT_FEATURES

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return states[:, 0]


class EagerDiagonal(DiagonalNormal):
    """The paper's diagonal Gaussian family (prior or posterior MLP) with pyro's own Normal, whose
    log density works on the L-fold expanded parameters (the families' BroadcastNormal does not)."""

    def forward(self, features: torch.Tensor):
        loc, scale = self.loc_scale(features)
        return Normal(loc, scale).to_event(1)


def vkd_module(L: int = 1, M: int = 1, vectorize: bool = True, dropout: float = 0.5,
               eager: bool = False) -> VKDModule:
    """The VKD module (Trace_ELBO, L guide particles, M prior samples) on cached features.
    eager: the diagonal Gaussians are pyro's Normal instead of the families' BroadcastNormal."""
    prior_net = EagerDiagonal(IMAGE_FEATURES, Z, HIDDEN, dropout) if eager else None
    posterior_net = EagerDiagonal(TEXT_FEATURES, Z, HIDDEN, dropout) if eager else None
    model = VKDModel(CachedImageFeatures(), NUM_CLASSES, z_dim=Z, hidden=HIDDEN, dropout=dropout, prior_samples=M,
                     prior_net=prior_net)
    guide = EHRPosterior(PooledText(), z_dim=Z, hidden=HIDDEN, dropout=dropout, posterior_net=posterior_net)
    return VKDModule(model, guide, elbo="trace", num_particles=L, vectorize_particles=vectorize)


def cached_batch(seed: int = 0, batch: int = BATCH) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(images=torch.randn(batch, IMAGE_FEATURES, generator=g),
                 labels=(torch.rand(batch, NUM_CLASSES, generator=g) < 0.2).float(),
                 index=torch.arange(batch), token_states=torch.randn(batch, 1, TEXT_FEATURES, generator=g),
                 token_mask=torch.ones(batch, 1, dtype=torch.bool))


def step_times(steps: dict[str, Callable[[], None]], warmup: int, rounds: int, per_round: int) -> dict:
    """Wall time (ms) of one call of each function, one value a round. The functions are timed in
    turns, a round of `per_round` calls each, so that load from other processes hits them alike
    (and round r of one function can be paired with round r of another: :func:`paired_ratio`)."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            times[name].append((time.perf_counter() - start) / per_round * 1000)
    return times


def medians(times: dict) -> dict:
    """The median of each function's rounds (:func:`step_times`)."""
    return {name: statistics.median(values) for name, values in times.items()}


def median_step_ms(steps: dict[str, Callable[[], None]], warmup: int, rounds: int, per_round: int) -> dict:
    """Median wall time (ms) of one call of each function over the rounds of :func:`step_times`."""
    return medians(step_times(steps, warmup, rounds, per_round))


def paired_ratio(numerator: list, denominator: list, replicates: int = 2000, seed: int = 0) -> tuple:
    """The median over rounds of the per-round ratio numerator[r] / denominator[r] (two functions
    timed back to back in the same round), and its 95% bootstrap interval (percentile, rounds resampled
    with replacement): (median, low, high)."""
    ratios = torch.tensor(numerator, dtype=torch.float64) / torch.tensor(denominator, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    draws = ratios[torch.randint(len(ratios), (replicates, len(ratios)), generator=g)].median(dim=1).values
    low, high = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return statistics.median(ratios.tolist()), low, high


def machine() -> str:
    """CPU model (from /proc/cpuinfo), cores torch uses, torch and Pyro versions."""
    import pyro

    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}, pyro {pyro.__version__}"


def timing_parser(description: str, particles_help: str = "L values") -> argparse.ArgumentParser:
    """The command-line options every CPU benchmark shares: rounds, steps a round, warm-up, threads, L."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--particles", type=int, nargs="+", default=[1, 4, 16], help=particles_help)
    return parser
