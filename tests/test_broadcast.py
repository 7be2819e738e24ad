"""BroadcastNormal: the same ELBO values as pyro's Normal under vectorised particles, lazily broadcast."""

import pyro
import pytest
import torch
from pyro.distributions import Normal
from pyro.distributions.torch_distribution import ExpandedDistribution
from torch.distributions import kl_divergence

from guides import EHRPosterior
from models import VKDModel
from tests.conftest import FeaturesAsImages, MaskedMeanHead
from vkd_pyro.batching import Batch
from vkd_pyro.broadcast import BroadcastNormal
from vkd_pyro.module import VKDModule
from vkd_pyro.networks import GaussianMLP


def tiny_batch():
    g = torch.Generator().manual_seed(0)
    return Batch(images=torch.randn(8, 5, generator=g), labels=(torch.rand(8, 14, generator=g) < 0.3).float(),
                 index=torch.arange(8), token_states=torch.randn(8, 4, 6, generator=g),
                 token_mask=torch.ones(8, 4, dtype=torch.bool))


class Lazy(GaussianMLP):
    def forward(self, x):
        loc, scale = self.loc_scale(x)
        return BroadcastNormal(loc, scale).to_event(1)


def modules(elbo: str, L: int):
    plain = VKDModule(VKDModel(FeaturesAsImages(5), 14, z_dim=3, hidden=[8], dropout=0.0),
                      EHRPosterior(MaskedMeanHead(6), 3, [8], 0.0), elbo=elbo, num_particles=L)
    lazy = VKDModule(VKDModel(FeaturesAsImages(5), 14, z_dim=3, hidden=[8], dropout=0.0,
                              prior_net=Lazy(5, [8], 3, 0.0)),
                     EHRPosterior(MaskedMeanHead(6), 3, [8], 0.0, posterior_net=Lazy(6, [8], 3, 0.0)),
                     elbo=elbo, num_particles=L)
    lazy.load_state_dict(plain.state_dict())
    return plain, lazy


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_same_loss_terms_and_gradients_as_the_eager_normal(elbo):
    plain, lazy = modules(elbo, L=5)
    batch = tiny_batch()
    results = []
    for module in (plain, lazy):
        pyro.set_rng_seed(4)
        loss, terms = module(batch, 0.7)
        loss.backward()
        results.append((loss.item(), terms, [p.grad.clone() for p in module.parameters()]))
    (a, ta, ga), (b, tb, gb) = results
    assert b == pytest.approx(a, rel=1e-6)
    assert tb.kl == pytest.approx(ta.kl, rel=1e-6) and tb.image_nll == pytest.approx(ta.image_nll, rel=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)


def test_expansion_is_lazy_and_the_kl_closed_form():
    q = BroadcastNormal(torch.zeros(4, 3), torch.ones(4, 3))
    p = BroadcastNormal(torch.ones(4, 3), 2 * torch.ones(4, 3))
    qe, pe = q.expand((7, 4, 3)), p.expand((7, 4, 3))
    assert isinstance(qe, ExpandedDistribution) and q.expand((4, 3)) is q
    expected = kl_divergence(Normal(q.loc, q.scale), Normal(p.loc, p.scale))
    assert torch.equal(kl_divergence(qe, pe), expected.expand(7, 4, 3))
    z = torch.randn(7, 4, 3)
    torch.testing.assert_close(qe.log_prob(z), Normal(q.loc, q.scale).expand((7, 4, 3)).log_prob(z))
