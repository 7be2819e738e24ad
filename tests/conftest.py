"""Shared test fixtures: tiny stand-in networks so that objective tests run in milliseconds."""

import pyro
import pytest
import torch
from torch import nn

from vkd_pyro.data.batching import Batch


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


def tiny_batch() -> Batch:
    """Eight records: 5-d image features, 14 labels, 4 report tokens of width 6 (FeaturesAsImages(5),
    MaskedMeanHead(6))."""
    g = torch.Generator().manual_seed(0)
    return Batch(images=torch.randn(8, 5, generator=g), labels=(torch.rand(8, 14, generator=g) < 0.3).float(),
                 index=torch.arange(8), token_states=torch.randn(8, 4, 6, generator=g),
                 token_mask=torch.ones(8, 4, dtype=torch.bool))


@pytest.fixture(autouse=True)
def _seeded():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def tiny_trained_run(tmp_path_factory):
    """A finished one-epoch tiny run (tests.tiny_runs: 32 px, z_dim 16, data.split_seed 0), trained
    once a session for the modules that read or copy it (`tests.tiny_runs.copy_run`); not to be edited."""
    from tests.tiny_runs import train_tiny_run

    return train_tiny_run(tmp_path_factory, "objectives")


@pytest.fixture(scope="module")
def phantom_factory(tmp_path_factory):
    """A function that builds a fresh 300-report openi_phantom dataset at 16 px (one cache per module)."""
    from vkd_pyro.data.openi_phantom import OpenIPhantomDataset
    cache = tmp_path_factory.mktemp("cache")
    return lambda: OpenIPhantomDataset(image_size=16, max_reports=300, cache_dir=cache)


def phantom_config(**data):
    """The config of `phantom_factory`'s dataset with `data` keys changed."""
    from vkd_pyro.config import config_from_dict
    return config_from_dict({"data": {"max_reports": 300, "image_size": 16, **data}})
