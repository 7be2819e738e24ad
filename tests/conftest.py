"""Shared test fixtures: tiny stand-in networks so that objective tests run in milliseconds."""

import pyro
import pytest
import torch
from torch import nn


class FeaturesAsImages(nn.Module):
    """An 'image encoder' whose input already is the feature vector x_I (B, F)."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, images):
        return images


class MaskedMeanHead(nn.Module):
    """A stand-in text head: masked mean of token states (B, T, H) -> (B, H), plus a linear map."""

    def __init__(self, hidden: int):
        super().__init__()
        self.out_features = hidden
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, states, mask):
        weights = mask.float().unsqueeze(-1)
        return self.linear((states * weights).sum(1) / weights.sum(1).clamp(min=1))


@pytest.fixture(autouse=True)
def _seeded():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    torch.set_num_threads(2)
    yield
