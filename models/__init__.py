"""Pyro models of vkd-pyro: the generative side of Eq. 8 (prior p(z_I|x_I), classifier, MI head).

Installed as `vkd_pyro.models`. `PRIORS` is the registry of prior families a config names with
`model.prior`: name -> (family class, default options).
"""

from vkd_pyro.models.families import DiagonalNormal, Flow, LowRankNormal, MixtureNormal, StandardNormal
from vkd_pyro.models.text_only import ReportBottleneck
from vkd_pyro.models.vkd import DistilledModel, VKDModel, tempered

PRIORS = {
    "diagonal": (DiagonalNormal, {}),  # the paper's
    "lowrank": (LowRankNormal, {}),
    "mixture": (MixtureNormal, {}),
    "flow": (Flow, {"transform": "affine_coupling"}),  # one pass to sample and to score a foreign z
    "standard": (StandardNormal, {}),
}

__all__ = ["VKDModel", "DistilledModel", "ReportBottleneck", "tempered", "PRIORS"]
