"""Families that are not registered: named in a config by import path (`tests.custom_families:Name`).

They stand for what a researcher drops into `models/` or `guides/`: nothing in the library names them.
"""

import pyro.distributions as dist
import torch
from torch import nn

from vkd_pyro.models.families import DiagonalNormal


class TemperedNormalPosterior(nn.Module):
    """q(z_T | x_T) = N(loc(x_T), diag (exp(t) scale(x_T))^2), with one learned log-temperature t."""

    def __init__(self, in_features, z_dim, hidden, dropout, log_temperature: float = 0.0):
        super().__init__()
        self.net = DiagonalNormal(in_features, z_dim, hidden, dropout)
        self.log_temperature = nn.Parameter(torch.tensor(float(log_temperature)))

    def forward(self, features):
        loc, scale = self.net.loc_scale(features)
        return dist.Normal(loc, scale * self.log_temperature.exp()).to_event(1)


class StudentTPrior(nn.Module):
    """p(z_I | x_I) = prod_d StudentT(df; loc_d(x_I), scale_d(x_I)): no closed-form KL against a Normal."""

    def __init__(self, in_features, z_dim, hidden, dropout, df: float = 4.0):
        super().__init__()
        self.net = DiagonalNormal(in_features, z_dim, hidden, dropout)
        self.df = float(df)

    def forward(self, features):
        loc, scale = self.net.loc_scale(features)
        return dist.StudentT(torch.full_like(loc, self.df), loc, scale).to_event(1)


NOT_A_FAMILY = 3  # for the error test: importable, but not an nn.Module class
