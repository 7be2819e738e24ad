"""BroadcastNormal (the diagonal families' Normal): the same ELBO values as pyro's Normal under vectorised
particles, with log densities on the unexpanded parameters."""

import pyro
import pytest
import torch
from pyro.distributions import Normal
from torch.distributions import kl_divergence

from tests.conftest import FeaturesAsImages, MaskedMeanHead, tiny_batch
from vkd_pyro.guides import EHRPosterior
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.models import VKDModel
from vkd_pyro.models.distributions import BroadcastNormal
from vkd_pyro.models.families import DiagonalNormal


class Eager(DiagonalNormal):
    """The diagonal family with pyro's own Normal (log densities on the expanded parameters)."""

    def forward(self, x):
        loc, scale = self.loc_scale(x)
        return Normal(loc, scale).to_event(1)


def modules(elbo: str, L: int):
    plain = VKDModule(VKDModel(FeaturesAsImages(5), 14, z_dim=3, hidden=[8], dropout=0.0,
                               prior_net=Eager(5, 3, [8], 0.0)),
                      EHRPosterior(MaskedMeanHead(6), 3, [8], 0.0, posterior_net=Eager(6, 3, [8], 0.0)),
                      elbo=elbo, num_particles=L)
    lazy = VKDModule(VKDModel(FeaturesAsImages(5), 14, z_dim=3, hidden=[8], dropout=0.0),
                     EHRPosterior(MaskedMeanHead(6), 3, [8], 0.0), elbo=elbo, num_particles=L)
    lazy.load_state_dict(plain.state_dict())
    return plain, lazy


def test_the_diagonal_families_use_it():
    _, lazy = modules("trace", L=2)
    assert isinstance(lazy.model.prior(torch.randn(4, 5)).base_dist, BroadcastNormal)


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


def test_expansion_keeps_the_parameters_and_the_values():
    loc, scale = torch.randn(4, 3), torch.rand(4, 3) + 0.5
    q = BroadcastNormal(loc, scale)
    qe = q.expand((2, 4, 3)).expand((7, 2, 4, 3))
    assert isinstance(qe, BroadcastNormal) and qe.batch_shape == (7, 2, 4, 3)
    assert qe.unexpanded()[0] is loc and qe.unexpanded()[1] is scale  # what log_prob computes on
    eager = Normal(loc, scale).expand((7, 2, 4, 3))
    z = torch.randn(7, 2, 4, 3)
    torch.testing.assert_close(qe.log_prob(z), eager.log_prob(z))
    assert qe.log_prob(torch.randn(4, 3)).shape == (7, 2, 4, 3)  # broadcast to the batch shape, as Normal's
    torch.manual_seed(1)
    a = qe.rsample()
    torch.manual_seed(1)
    torch.testing.assert_close(a, eager.rsample())  # the same draws


def test_kl_is_that_of_normal():
    q = BroadcastNormal(torch.zeros(4, 3), torch.ones(4, 3)).expand((7, 4, 3))
    p = Normal(torch.ones(4, 3), 2 * torch.ones(4, 3)).expand((7, 4, 3))
    expected = 0.5 * (0.25 + 0.25 - 1) + torch.log(torch.tensor(2.0))  # KL(N(0,1) || N(1,4)) by hand
    torch.testing.assert_close(kl_divergence(q, p), expected.expand(7, 4, 3))
    torch.testing.assert_close(kl_divergence(p, q), kl_divergence(Normal(1.0, 2.0), Normal(0.0, 1.0)).expand(7, 4, 3))
