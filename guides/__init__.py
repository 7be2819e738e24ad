"""Pyro guides of vkd-pyro: the report-conditioned posterior q(z_T|x_T) (and no guide for image_only)."""

from guides.ehr_posterior import EHRPosterior, NoGuide
from guides.posteriors import DiagonalNormalPosterior, FlowPosterior, LowRankNormalPosterior

__all__ = ["EHRPosterior", "NoGuide", "DiagonalNormalPosterior", "LowRankNormalPosterior", "FlowPosterior"]
