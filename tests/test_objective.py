"""The objective of Eq. 8, pinned against an independent hand-written PyTorch computation.

Hand-written pieces: diagonal Gaussian KL(q || p) from its closed form, Bernoulli log-likelihoods
from `binary_cross_entropy_with_logits`, and expectations as plain Monte Carlo means of many draws.
"""

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine

from tests.conftest import FeaturesAsImages, MaskedMeanHead
from vkd_pyro.data.batching import Batch
from vkd_pyro.guides import EHRPosterior, NoGuide
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.models import VKDModel
from vkd_pyro.objectives.resolve import GUIDES, PRIORS, build_family

B, FEAT, HID, T, Z, C = 4, 5, 6, 7, 3, 14
FAMILY_OPTIONS = {"lowrank": {"rank": 2}, "mixture": {"components": 3}}  # tiny ones; the rest: defaults


def make_module(objective="vkd", L=1, M=1, elbo="trace", z_dim=Z, prior="diagonal", guide="diagonal"):
    """A module on tiny stand-in networks; `prior` and `guide` name families (registered or import paths).
    The diagonal ones are built by VKDModel and EHRPosterior themselves (their defaults)."""
    prior_net = None if prior == "diagonal" else build_family(
        "prior", prior, FEAT, z_dim, [8, 8], 0.0, FAMILY_OPTIONS.get(prior))
    model = VKDModel(FeaturesAsImages(FEAT), C, z_dim=z_dim, hidden=[8, 8], dropout=0.0, prior_samples=M,
                     latent_from_guide=objective != "image_only", mutual_information=objective == "vkd",
                     prior_net=prior_net)
    if objective == "image_only":
        return VKDModule(model, NoGuide(), elbo=elbo, num_particles=L)
    posterior_net = None if guide == "diagonal" else build_family(
        "guide", guide, HID, z_dim, [8, 8], 0.0, FAMILY_OPTIONS.get(guide))
    posterior = EHRPosterior(MaskedMeanHead(HID), z_dim, [8, 8], 0.0, posterior_net=posterior_net)
    return VKDModule(model, posterior, elbo=elbo, num_particles=L)


def make_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False
    return Batch(images=torch.randn(B, FEAT, generator=g), labels=(torch.rand(B, C, generator=g) < 0.3).float(),
                 index=torch.arange(B), token_states=torch.randn(B, T, HID, generator=g), token_mask=mask)


def copy_weights(src, dst):
    dst.load_state_dict(src.state_dict())


def gaussian_kl(mq, sq, mp, sp):
    """KL(N(mq, sq^2) || N(mp, sp^2)) summed over the last dim, by its closed form."""
    return (torch.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5).sum(-1)


def log_bernoulli(logits, y):
    return -F.binary_cross_entropy_with_logits(logits, y.expand(logits.shape), reduction="none").sum(-1)


def hand_terms(module, batch, draws=200_000):
    """Per-example E_p[log p(y|x,z_I)], E_q[log q(y|z_T)], KL(q||p) and KL(p||q), by hand."""
    model, guide = module.model, module.guide
    with torch.no_grad():
        mp, sp = model.prior_net.loc_scale(batch.images)
        g = torch.Generator().manual_seed(7)
        z_prior = mp + sp * torch.randn((draws,) + mp.shape, generator=g)
        image_ll = log_bernoulli(model.class_logits(z_prior, batch.images), batch.labels).mean(0)
        out = {"image_ll": image_ll, "prior": (mp, sp)}
        if isinstance(guide, EHRPosterior):
            mq, sq = guide.posterior_net.loc_scale(guide.text_head(batch.token_states, batch.token_mask))
            z_post = mq + sq * torch.randn((draws,) + mq.shape, generator=g)
            if model.text_classifier is not None:
                out["text_ll"] = log_bernoulli(model.text_classifier(z_post), batch.labels).mean(0)
            out["kl_qp"] = gaussian_kl(mq, sq, mp, sp)
            out["kl_pq"] = gaussian_kl(mp, sp, mq, sq)
            out["posterior"] = (mq, sq)
    return out


def mean_loss(module, batch, beta, repeats=1):
    return sum(module(batch, beta)[0].item() for _ in range(repeats)) / repeats


def test_vkd_loss_is_minus_eq8_with_beta_on_kl_only():
    module, batch = make_module(L=4000, M=4000), make_batch()
    beta = 0.3
    hand = hand_terms(module, batch)
    expected = -(hand["image_ll"] + hand["text_ll"] - beta * hand["kl_qp"]).mean().item()
    loss, terms = module(batch, beta)
    assert loss.item() == pytest.approx(expected, abs=0.03)
    assert terms.image_nll == pytest.approx(-hand["image_ll"].mean().item(), abs=0.03)
    assert terms.text_nll == pytest.approx(-hand["text_ll"].mean().item(), abs=0.03)
    assert terms.kl == pytest.approx(hand["kl_qp"].mean().item(), rel=1e-5)
    assert terms.beta == beta
    # The ELBO's own (Monte Carlo) KL is what remains of the loss after the two likelihood terms.
    assert (terms.loss - terms.image_nll - terms.text_nll) / beta == pytest.approx(hand["kl_qp"].mean().item(), abs=0.1)


@pytest.mark.parametrize("elbo, prior", [("trace", "diagonal"), ("meanfield", "diagonal"), ("trace", "lowrank"),
                                         ("meanfield", "lowrank"), ("meanfield", "standard")])  # KL > 0: analytic
def test_zero_kl_weight_removes_the_kl_term_exactly(elbo, prior):
    module, batch = make_module(L=3, M=2, elbo=elbo, prior=prior), make_batch()
    loss, terms = module(batch, 0.0)
    assert terms.loss == pytest.approx(terms.image_nll + terms.text_nll, abs=1e-6)
    assert terms.kl > 0  # still recorded, unweighted
    loss.backward()
    assert module.guide.posterior_net.net.head.weight.grad.abs().sum() > 0  # through the MI term


def make_asymmetric(module):
    """Give the prior a narrow scale and the posterior a wide one, so KL(q||p) != KL(p||q)."""
    with torch.no_grad():
        module.model.prior_net.net.head.bias[Z:] = -3.0  # softplus(-3) ~ 0.05
        module.guide.posterior_net.net.head.bias[Z:] = 1.0  # softplus(1) ~ 1.3


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_kl_direction_is_q_text_given_report_to_p_image_prior(elbo):
    module, batch = make_module(L=2000, M=10, elbo=elbo), make_batch()
    make_asymmetric(module)
    hand = hand_terms(module, batch, draws=1000)
    kl_qp, kl_pq = hand["kl_qp"].mean().item(), hand["kl_pq"].mean().item()
    assert kl_qp > 5 * kl_pq  # the two directions are far apart here
    loss, terms = module(batch, 1.0)
    kl_in_loss = terms.loss - terms.image_nll - terms.text_nll  # beta = 1: no hidden 1e-3 weight
    assert kl_in_loss == pytest.approx(kl_qp, rel=0.05)
    assert terms.kl == pytest.approx(kl_qp, rel=1e-5)


def test_monte_carlo_counts_average_not_sum():
    batch, reference = make_batch(), make_module()
    hand = hand_terms(reference, batch)
    for L, M in [(1, 1), (16, 64)]:
        module = make_module(L=L, M=M)
        copy_weights(reference, module)
        values = [module(batch, 0.5)[1] for _ in range(300)]
        image_nll = sum(v.image_nll for v in values) / len(values)
        text_nll = sum(v.text_nll for v in values) / len(values)
        assert image_nll == pytest.approx(-hand["image_ll"].mean().item(), abs=0.05)
        assert text_nll == pytest.approx(-hand["text_ll"].mean().item(), abs=0.05)


def test_more_particles_reduce_variance_of_the_loss():
    batch, reference = make_batch(), make_module()
    spread = {}
    for L, M in [(1, 1), (32, 32)]:
        module = make_module(L=L, M=M)
        copy_weights(reference, module)
        spread[L] = torch.tensor([module(batch, 1.0)[0].item() for _ in range(200)]).std().item()
    assert spread[32] < spread[1] / 3  # ~ 1/sqrt(32) of it


def test_image_only_is_the_classification_term_alone():
    module, batch = make_module("image_only", M=20000), make_batch()
    hand = hand_terms(module, batch)
    loss, terms = module(batch, 0.7)
    assert loss.item() == pytest.approx(-hand["image_ll"].mean().item(), abs=0.02)
    assert terms.kl == 0.0 and terms.text_nll == 0.0
    args, kwargs = module.batch_args(batch, 0.7)
    trace = poutine.trace(module.model).get_trace(*args, **kwargs)
    assert "z" not in trace.nodes  # no log p(z) without a guide
    assert "text_labels" not in trace.nodes


def test_no_mi_drops_only_the_mi_term():
    module, batch = make_module("no_mi", L=4000, M=4000), make_batch()
    hand = hand_terms(module, batch)
    loss, terms = module(batch, 0.5)
    assert terms.text_nll == 0.0
    expected = -(hand["image_ll"] - 0.5 * hand["kl_qp"]).mean().item()
    assert loss.item() == pytest.approx(expected, abs=0.03)


@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("guide", list(GUIDES))
def test_site_shapes_with_vectorised_particles(prior, guide):
    L, M = 5, 3
    module, batch = make_module(L=L, M=M, prior=prior, guide=guide), make_batch()
    args, kwargs = module.batch_args(batch, 1.0)
    _, ((model_trace,), (guide_trace,)) = module.elbo.loss_and_sites(module.model, module.guide, *args, **kwargs)
    # one vectorised run each, as Pyro ran them

    def log_prob(name):
        site = model_trace.nodes[name]
        return site["fn"].log_prob(site["value"])

    assert guide_trace.nodes["z"]["value"].shape == (L, B, Z)
    assert model_trace.nodes["z"]["value"].shape == (L, B, Z)
    assert log_prob("z").shape == (L, B)
    assert log_prob("text_labels").shape == (L, B)
    # the image term's M draws are averaged inside, then broadcast over the L particles
    assert log_prob("image_log_lik").shape == (L, B)
    assert torch.equal(model_trace.nodes["z"]["value"], guide_trace.nodes["z"]["value"])  # replayed


def test_guide_samples_are_reparameterised_draws_not_means():
    module, batch = make_module(), make_batch()
    args, kwargs = module.batch_args(batch)
    draws = torch.stack([poutine.trace(module.guide).get_trace(*args, **kwargs).nodes["z"]["value"]
                         for _ in range(3000)])
    mq, sq = hand_terms(module, batch, draws=10)["posterior"]
    assert draws.std(0).detach() == pytest.approx(sq, rel=0.1)  # a mean of 100 draws would be 10x narrower
    assert draws.mean(0).detach() == pytest.approx(mq, abs=4 * sq.max().item() / math.sqrt(3000))
    z = poutine.trace(module.guide).get_trace(*args, **kwargs).nodes["z"]
    assert z["value"].requires_grad and z["fn"].has_rsample


@pytest.mark.parametrize("prior, guide", [("diagonal", "diagonal"), ("lowrank", "lowrank"), ("mixture", "flow"),
                                          ("flow", "diagonal")])
def test_all_networks_receive_gradients(prior, guide):
    module, batch = make_module(L=2, M=2, prior=prior, guide=guide), make_batch()
    loss, _ = module(batch, 0.5)
    loss.backward()
    for name in ["model.prior_net", "model.classifier", "model.text_classifier", "guide.text_head", "guide.posterior_net"]:
        grads = [p.grad for n, p in module.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_label_mask_removes_masked_classes_from_both_likelihoods():
    module, batch = make_module(L=1, M=1), make_batch()
    flipped = Batch(**{**batch.__dict__, "labels": batch.labels.clone()})
    flipped.labels[:, 3] = 1 - flipped.labels[:, 3]
    mask = torch.ones(B, C)
    mask[:, 3] = 0
    losses = []
    for b in (batch, flipped):
        pyro.set_rng_seed(11)
        losses.append(module(Batch(**{**b.__dict__, "label_mask": mask}), 1.0)[0].item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    pyro.set_rng_seed(11)
    unmasked = module(flipped, 1.0)[0].item()
    assert unmasked != pytest.approx(losses[1], abs=1e-3)


def test_prediction_uses_the_prior_alone_algorithm_2():
    module, batch = make_module(), make_batch()
    module.eval()
    S = 20000
    probs = module.predict(batch.images, S)
    assert probs.shape == (S, B, C)
    mp, sp = module.model.prior_net.loc_scale(batch.images)
    g = torch.Generator().manual_seed(5)
    z = mp + sp * torch.randn((S,) + mp.shape, generator=g)
    expected = torch.sigmoid(module.model.class_logits(z, batch.images)).mean(0)
    assert probs.mean(0) == pytest.approx(expected.detach(), abs=0.01)
    assert probs.std(0).max() > 0  # a Monte Carlo spread, not one deterministic pass
