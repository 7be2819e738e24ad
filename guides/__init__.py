"""Pyro guides of vkd-pyro: the report-conditioned posterior q(z_T|x_T) (and no guide for image_only).

Installed as `vkd_pyro.guides`. `GUIDES` is the registry of posterior families a config names with
`model.guide`: name -> (family class, default options). A guide's distribution should have `rsample`
(all of these do): Trace_ELBO would otherwise fall back on score-function gradients for site "z".
"""

from vkd_pyro.guides.ehr_posterior import EHRPosterior, NoGuide
from vkd_pyro.models.families import DiagonalNormal, Flow, LowRankNormal

GUIDES = {
    "diagonal": (DiagonalNormal, {}),  # the paper's
    "lowrank": (LowRankNormal, {}),
    "flow": (Flow, {"transform": "affine_autoregressive"}),  # IAF: the guide scores only its own samples
}

__all__ = ["EHRPosterior", "NoGuide", "GUIDES"]
