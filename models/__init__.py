"""Pyro models of vkd-pyro: the generative side of Eq. 8 (prior p(z_I|x_I) and classifiers)."""

from models.priors import (DiagonalNormalPrior, FlowPrior, LowRankNormalPrior, MixtureNormalPrior,
                           StandardNormalPrior)
from models.vkd import VKDModel

__all__ = ["VKDModel", "DiagonalNormalPrior", "LowRankNormalPrior", "MixtureNormalPrior", "FlowPrior",
           "StandardNormalPrior"]
