"""The path-derivative ("sticking the landing") estimator, `inference.elbo: stl` (Roeder et al. 2017).

Against Trace_ELBO on the tiny module of tests/test_objective.py: the same loss and recorded terms on
the same draws, the same expected gradient within Monte Carlo error; on a conjugate Gaussian whose
guide is the exact posterior, a gradient of exactly zero for every draw where Trace_ELBO's varies;
and the refusal of a guide whose parameters cannot be detached (a normalising flow).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from tests.test_families import DIMS, tiny_batch
from tests.test_objective import FEAT, Z, copy_weights, make_batch, make_module
from vkd_pyro.config import config_from_dict
from vkd_pyro.errors import ConfigError
from vkd_pyro.inference.elbo import RecordedELBO
from vkd_pyro.inference.kl import free_bits_kl_sum
from vkd_pyro.inference.stl import NotDetachable, PathDerivativeELBO, detached
from vkd_pyro.objectives.resolve import PRIORS, build_family
from vkd_pyro.training.build import build_module

GROUPS = ("model.prior_net", "model.classifier", "model.text_classifier", "guide.text_head", "guide.posterior_net")


def paired_modules(L=1, M=1, guide="diagonal"):
    """(trace, stl): the tiny module twice, with the same weights."""
    trace = make_module(L=L, M=M, elbo="trace", guide=guide)
    stl = make_module(L=L, M=M, elbo="stl", guide=guide)
    copy_weights(trace, stl)
    return trace, stl


def gradient_draws(module, batch, draws, seed):
    """The flattened gradient of each of `draws` independent losses (draws, parameters), and each
    parameter's group (its name's first two parts)."""
    pyro.set_rng_seed(seed)
    rows = []
    for _ in range(draws):
        module.zero_grad()
        module(batch, 0.7)[0].backward()
        rows.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
    groups = [".".join(name.split(".")[:2]) for name, p in module.named_parameters() for _ in range(p.numel())]
    return torch.stack(rows).double(), groups


# --------------------------------------------------------------------------- (a) the same expected gradient


def test_expected_gradient_equals_trace_elbos_within_monte_carlo_error():
    """Independent draws of each estimator (L = 4 particles each): per parameter, the two mean
    gradients differ by less than 5.5 standard errors of their difference (from the observed spreads;
    a union bound over the ~600 parameters keeps a chance failure below 1e-4; measured: at most 3.4).
    Each group's mean gradient is over 10 standard errors from zero, so the check is not vacuous: an
    estimator that also cuts z's path through log q (a biased one) fails it with |z| up to 57."""
    trace, stl = paired_modules(L=4, M=4)
    batch, n = make_batch(), 400
    g_trace, groups = gradient_draws(trace, batch, n, seed=1)
    g_stl, _ = gradient_draws(stl, batch, n, seed=2)
    se = ((g_trace.var(0) + g_stl.var(0)) / n).sqrt()
    z = (g_stl.mean(0) - g_trace.mean(0)).abs() / (se + 1e-12)
    for group in GROUPS:
        inside = torch.tensor([g == group for g in groups])
        assert z[inside].max() < 5.5, (group, z[inside].max().item())
        assert g_trace.mean(0)[inside].norm() > 10 * se[inside].norm(), group  # the check has power
    guide = torch.tensor([g.startswith("guide.") for g in groups])
    assert not torch.allclose(g_stl.var(0)[guide], g_trace.var(0)[guide])  # two estimators, not one


# --------------------------------------------------------------------------- (b) zero variance at the posterior


MU0, S0, S_LIK, X = 0.5, 1.2, 0.7, 1.3  # z ~ N(MU0, S0^2), x | z ~ N(z, S_LIK^2), x = X observed


def exact_posterior():
    """(mean, sd) of p(z | x): precision 1/S0^2 + 1/S_LIK^2, mean (MU0/S0^2 + X/S_LIK^2) / precision."""
    precision = 1 / S0**2 + 1 / S_LIK**2
    return (MU0 / S0**2 + X / S_LIK**2) / precision, precision**-0.5


def gaussian_programs(kind):
    """(model, guide, guide parameters) with q(z) = N(loc, exp(log_scale)^2) set to the model's exact
    posterior; kind "posterior": the conjugate model above; kind "kl": the model p(z) = q(z), no data."""
    mean, sd = exact_posterior()
    loc = torch.tensor(mean, dtype=torch.float64, requires_grad=True)
    log_scale = torch.tensor(math.log(sd), dtype=torch.float64, requires_grad=True)

    def guide():
        pyro.sample("z", dist.Normal(loc, log_scale.exp()))

    def model():
        if kind == "kl":
            pyro.sample("z", dist.Normal(loc.detach(), log_scale.exp().detach()))
            return
        z = pyro.sample("z", dist.Normal(torch.tensor(MU0, dtype=torch.float64), S0))
        pyro.sample("x", dist.Normal(z, S_LIK), obs=torch.tensor(X, dtype=torch.float64))

    return model, guide, (loc, log_scale)


def guide_gradients(kind, elbo, draws=200):
    """(draws, 2): the gradient w.r.t. (loc, log_scale) of `draws` independent losses."""
    model, guide, params = gaussian_programs(kind)
    rows = []
    for _ in range(draws):
        rows.append(torch.stack(torch.autograd.grad(elbo.loss_and_sites(model, guide)[0], params)))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["posterior", "kl"])
@pytest.mark.parametrize("L", [1, 4])
def test_gradient_is_exactly_zero_when_q_is_the_exact_posterior(kind, L):
    stl = guide_gradients(kind, RecordedELBO("stl", L))
    trace = guide_gradients(kind, RecordedELBO("trace", L))
    assert stl.abs().max() < 1e-12  # every draw: variance 0 (float64 rounding aside)
    assert trace.var(0).min() > 0.5 / L  # the score term's spread: 1/sd^2 = 2.7 (loc) and 2 (log_scale), / L


def test_loss_and_grads_is_the_path_derivative_too():
    """The estimator used directly, as SVI does (`loss_and_grads` on Pyro params), gives the same zero
    gradient for every draw."""
    model, _, (loc, log_scale) = gaussian_programs("posterior")

    def guide():
        scale = pyro.param("scale", log_scale.detach().exp(), constraint=dist.constraints.positive)
        pyro.sample("z", dist.Normal(pyro.param("loc", loc.detach()), scale))

    for _ in range(20):
        loss = PathDerivativeELBO().loss_and_grads(model, guide)
        params = [pyro.param(name).unconstrained() for name in ("loc", "scale")]
        assert math.isfinite(loss) and all(p.grad.abs() < 1e-12 for p in params)
        for p in params:
            p.grad = None


# --------------------------------------------------------------------------- (c) the same loss and terms


@pytest.mark.parametrize("L, guide, explicit_kl", [(1, "diagonal", False), (4, "diagonal", False),
                                                    (3, "lowrank", False), (2, "diagonal", True)])
def test_loss_and_recorded_terms_equal_trace_elbos_on_the_same_draws(L, guide, explicit_kl):
    trace, stl = paired_modules(L=L, M=2, guide=guide)
    if explicit_kl:  # free bits read q off the recorded guide site: it must be the guide's own Normal
        trace.kl = stl.kl = lambda q, p: free_bits_kl_sum(q, p, 0.1)
    batch = make_batch()
    for seed in (3, 4):
        pyro.set_rng_seed(seed)
        loss_trace, terms_trace = trace(batch, 0.7, sync_terms=False)
        pyro.set_rng_seed(seed)
        loss_stl, terms_stl = stl(batch, 0.7, sync_terms=False)
        assert torch.equal(loss_stl, loss_trace) and torch.equal(terms_stl, terms_trace)
    trace.zero_grad()
    stl.zero_grad()
    loss_trace.backward()
    loss_stl.backward()
    for (name, p), q in zip(trace.named_parameters(), stl.parameters()):
        if name.startswith("model."):  # log q(z) is no part of the model's gradient
            torch.testing.assert_close(q.grad, p.grad)
    differs = [not torch.allclose(q.grad, p.grad) for (name, p), q in zip(trace.named_parameters(), stl.parameters())
               if name.startswith("guide.posterior_net")]
    assert any(differs) != explicit_kl  # the score term is gone, unless site "z" is masked out of the ELBO


# --------------------------------------------------------------------------- (d) what cannot be detached


@pytest.mark.parametrize("family", [name for name in PRIORS if name != "flow"])
def test_detached_copies_score_alike_without_gradient(family):
    net = build_family("prior", family, FEAT, Z, [8], 0.0, {"rank": 2} if family == "lowrank" else None)
    q = net(torch.randn(3, FEAT)).expand((2, 3))
    z = q.sample()
    copy = detached(q)
    torch.testing.assert_close(copy.log_prob(z), q.log_prob(z), rtol=0, atol=0)
    assert not copy.log_prob(z).requires_grad and type(copy) is type(q)
    assert q.log_prob(z).requires_grad or family == "standard"  # the original is untouched


def test_a_flow_guide_is_refused_with_one_line_naming_inference_elbo():
    config = config_from_dict({"data": {"image_size": 16}, "image_encoder": {"name": "small_cnn", "width": 2,
                                                                            "out_features": 8},
                               "model": {"z_dim": Z, "hidden": [8], "dropout": 0.0, "guide": "flow"},
                               "inference": {"elbo": "stl"}})
    with pytest.raises(ConfigError) as err:  # when the module is built
        build_module(config, DIMS)
    message = str(err.value)
    assert message.startswith("inference.elbo: stl ") and "AffineAutoregressive" in message and "\n" not in message
    with pytest.raises(NotDetachable, match=r"^inference.elbo: stl "):  # built by hand: at its first step
        make_module(elbo="stl", guide="flow")(make_batch(), 1.0)
    config.model.guide = "lowrank"
    config.model.guide_options = {"rank": 2}
    loss, terms = build_module(config, DIMS)(tiny_batch(), 0.5)  # a low-rank Normal is detached
    assert math.isfinite(loss.item()) and terms.kl > 0
