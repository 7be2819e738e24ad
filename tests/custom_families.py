"""Families that are not registered: named in a config by import path (`tests.custom_families:Name`).

They stand for what a researcher writes in a module of their own: nothing in the library names them.
"""

import pyro.distributions as dist
import torch
from torch import nn

from vkd_pyro.models.families import DiagonalNormal
from vkd_pyro.models.networks import MLP, positive


class TemperedNormalPosterior(nn.Module):
    """q(z_T | x_T) = N(loc(x_T), diag (exp(t) scale(x_T))^2), with one learned log-temperature t.

    The README's example of a custom guide, as it stands there."""

    def __init__(self, in_features, z_dim, hidden, dropout, log_temperature: float = 0.0):
        super().__init__()
        self.net = MLP(in_features, hidden, 2 * z_dim, dropout)
        self.z_dim = z_dim
        self.log_temperature = nn.Parameter(torch.tensor(float(log_temperature)))

    def forward(self, features):
        loc, raw_scale = self.net(features).split(self.z_dim, dim=-1)
        return dist.Normal(loc, positive(raw_scale) * self.log_temperature.exp()).to_event(1)


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
