"""Families of priors and guides: the registry and config keys, training, the KL of every pairing, the
mixture prior's gradient estimator, Algorithm 2 with every prior, and custom families by import path.

Independent references: Gaussian KLs from the dense-covariance closed form written out here; the
mixture's log density by hand (log-sum-exp over components); a flow's log density by the change of
variables with the Jacobian from autograd; other KLs as a large-sample Monte Carlo mean of
log q(z) - log p(z), z ~ q, with its standard error.
"""

import functools
import math

import pyro.distributions as dist
import pytest
import torch

from tests.custom_families import StudentTPrior, TemperedNormalPosterior
from tests.test_objective import FEAT, HID, B, C, T, Z, make_batch, make_module
from vkd_pyro.config import config_from_dict
from vkd_pyro.data.batching import Batch
from vkd_pyro.errors import ConfigError
from vkd_pyro.models.families import ConditionalFamily
from vkd_pyro.models.prior_draws import draw, monte_carlo_mean
from vkd_pyro.objectives.resolve import GUIDES, PRIORS, build_family, kl_pairing, require_analytic_kl, resolve
from vkd_pyro.training.build import build_module, check_config

STUDENT = "tests.custom_families:StudentTPrior"
TEMPERED = "tests.custom_families:TemperedNormalPosterior"
# (prior, guide): every prior with the paper's guide, every guide with the paper's prior, and mixed ones.
PAIRS = ([(prior, "diagonal") for prior in PRIORS] + [("diagonal", guide) for guide in GUIDES if guide != "diagonal"]
         + [("lowrank", "lowrank"), ("standard", "lowrank"), ("mixture", "flow"), ("flow", "flow"),
            (STUDENT, TEMPERED)])
ANALYTIC = [("diagonal", "diagonal"), ("lowrank", "diagonal"), ("standard", "diagonal"), ("diagonal", "lowrank"),
            ("lowrank", "lowrank"), ("standard", "lowrank")]
NOT_ANALYTIC = [pair for pair in PAIRS if pair not in ANALYTIC]
assert len(NOT_ANALYTIC) == 6 and set(ANALYTIC) < set(PAIRS)


def features(seed=3, width=FEAT):
    return torch.randn(B, width, generator=torch.Generator().manual_seed(seed))


def prior_and_posterior(module, batch):
    with torch.no_grad():
        p = module.model.prior(module.model.image_encoder(batch.images))
        q = module.guide.posterior(batch.token_states, batch.token_mask)
    return p, q


# --------------------------------------------------------------------------- hand-written references


def dense_gaussian(d):
    """(mean (B, D), covariance (B, D, D)) of a diagonal or low-rank Normal, from its parameters."""
    if isinstance(d, dist.LowRankMultivariateNormal):
        W = d.cov_factor.double()
        return d.loc.double(), W @ W.transpose(-1, -2) + torch.diag_embed(d.cov_diag.double())
    loc, scale = torch.broadcast_tensors(d.base_dist.loc, d.base_dist.scale)
    return loc.double(), torch.diag_embed(scale.double() ** 2)


def gaussian_kl(q, p):
    """KL(q || p) = 1/2 [tr(S_p^-1 S_q) + (m_p - m_q)^T S_p^-1 (m_p - m_q) - D + log|S_p| - log|S_q|]."""
    (mq, Sq), (mp, Sp) = dense_gaussian(q), dense_gaussian(p)
    diff = (mp - mq).unsqueeze(-1)
    trace = torch.linalg.solve(Sp, Sq).diagonal(dim1=-2, dim2=-1).sum(-1)
    quad = (diff.transpose(-1, -2) @ torch.linalg.solve(Sp, diff)).squeeze(-1).squeeze(-1)
    return 0.5 * (trace + quad - mq.shape[-1] + torch.logdet(Sp) - torch.logdet(Sq))


def monte_carlo_kl(q, p, draws=200_000, seed=11):
    """(mean over the batch of 1/N sum log q(z) - log p(z), z ~ q; the per-example std of log q - log p)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        z = q.sample((draws,))
        ratio = (q.log_prob(z) - p.log_prob(z)).double()
    return ratio.mean(0), ratio.std(0)


def normal_log_density(z, loc, scale):
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


# --------------------------------------------------------------------------- registry and config keys


@pytest.mark.parametrize("kind, name", [("prior", n) for n in PRIORS] + [("guide", n) for n in GUIDES])
def test_registered_families_meet_the_interface(kind, name):
    net = build_family(kind, name, FEAT, Z, [8, 8], 0.0, {"rank": 2} if name == "lowrank" else None)
    assert isinstance(net, torch.nn.Module) and isinstance(net, ConditionalFamily)
    assert resolve(kind, name)[0] is type(net)
    d = net(features())
    assert d.batch_shape == (B,) and d.event_shape == (Z,)
    assert d.sample((5,)).shape == (5, B, Z) and d.expand((5, B)).sample().shape == (5, B, Z)
    assert d.log_prob(d.sample()).shape == (B,)
    assert d.has_rsample == (name != "mixture")  # the mixture declares it has none


def test_config_names_families_and_their_options():
    config = config_from_dict({}, overrides=["model.prior=lowrank", "model.prior_options={rank: 4}",
                                             "model.guide=flow", "model.guide_options.transform=spline",
                                             "model.guide_options.layers=3"])
    m = config.model
    assert (m.prior, m.prior_options, m.guide) == ("lowrank", {"rank": 4}, "flow")
    assert m.guide_options == {"transform": "spline", "layers": 3}
    defaults = config_from_dict({}).model
    assert (defaults.prior, defaults.guide) == ("diagonal", "diagonal")
    assert defaults.prior_options == {} and defaults.guide_options == {}
    custom = config_from_dict({"model": {"guide": TEMPERED, "guide_options": {"log_temperature": -1}}})
    assert custom.model.guide == TEMPERED


@pytest.mark.parametrize("overrides, message", [
    (["model.prior=gaussian"], "model.prior: unknown prior 'gaussian' (registered: diagonal, lowrank, mixture, flow, "
                               "standard; or an import path package.module:Name)"),
    (["model.guide=mixture"], "model.guide: unknown guide 'mixture' (registered: diagonal, lowrank, flow;"),
    (["model.guide=nowhere.at_all:Thing"], "model.guide: cannot import 'nowhere.at_all' for 'nowhere.at_all:Thing' "
                                           "(ModuleNotFoundError"),
    (["model.prior=tests.custom_families:Missing"], "model.prior: module 'tests.custom_families' has no 'Missing'"),
    (["model.prior=tests.custom_families:not-a-name"],
     "model.prior: 'tests.custom_families:not-a-name' is not an import path"),
    (["model.prior=tests.custom_families:NOT_A_FAMILY"], "is not an nn.Module class"),
    (["model.prior=lowrank", "model.prior_options={ranks: 2}"],
     "model.prior_options: 'lowrank' takes no option 'ranks' (its options: rank)"),
    (["model.guide_options={rank: 2}"], "model.guide_options: 'diagonal' takes no option 'rank' (its options: none)"),
    (["model.prior_options=3"], "model.prior_options: expected dict"),
    (["inference.elbo=jit"], "inference.elbo: 'jit' must be one of trace, meanfield"),
    (["inference.objective=full"], "inference.objective: unknown objective 'full' (registered: vkd, no_mi, image_only, "
                                   "text_only, kd; or an import path package.module:Name)"),
    (["inference.objective=tests.custom_families:NOT_A_FAMILY"],
     "inference.objective: 'tests.custom_families:NOT_A_FAMILY' is not a subclass of vkd_pyro.objectives.Objective"),
])
def test_family_mistakes_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:  # the config's own keys when it is read, the families before training
        check_config(config_from_dict({}, "my.yaml", overrides))
    text = str(err.value)
    assert message in text and "\n" not in text


def test_bad_option_values_are_config_errors_at_build_time():
    with pytest.raises(ConfigError, match=r"^model.prior_options: 'lowrank' rejected its options "
                                          r"\(rank must be in \[1, z_dim = 3\], got 9\)$"):
        build_family("prior", "lowrank", FEAT, Z, [8], 0.0, {"rank": 9})
    with pytest.raises(ConfigError, match="model.guide_options: 'flow' rejected its options .*transform must be"):
        build_family("guide", "flow", FEAT, Z, [8], 0.0, {"transform": "planar"})


# --------------------------------------------------------------------------- every family trains


def mean_loss(module, batch, repeats=5):
    with torch.no_grad():
        return sum(module(batch, 1.0)[0].item() for _ in range(repeats)) / repeats


@pytest.mark.parametrize("prior, guide, elbo", [(p, g, "trace") for p, g in PAIRS])
def test_every_family_trains(prior, guide, elbo):
    module, batch = make_module(L=2, M=2, elbo=elbo, prior=prior, guide=guide), make_batch()
    loss, _ = module(batch, 1.0)
    loss.backward()
    for name, parameter in module.named_parameters():  # every parameter is reached, the mixture weights too
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    before = mean_loss(module, batch)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.02)
    for _ in range(15):
        optimizer.zero_grad()
        loss, terms = module(batch, 1.0)
        assert all(math.isfinite(v) for v in terms.as_dict().values())
        loss.backward()
        optimizer.step()
    assert mean_loss(module, batch) < before - 3.0  # from ~21 nats: some 6 lower after 15 steps


# --------------------------------------------------------------------------- the KL of every pairing


@pytest.mark.parametrize("prior, guide", PAIRS)
def test_kl_term_matches_an_independent_estimate(prior, guide):
    L, N = 10_000, 100_000
    module, batch = make_module(L=L, M=1, prior=prior, guide=guide), make_batch()
    module.eval()
    p, q = prior_and_posterior(module, batch)
    loss, terms = module(batch, 1.0)
    kl_in_loss = terms.loss - terms.image_nll - terms.text_nll  # beta = 1: the ELBO's own (Monte Carlo) KL
    if (prior, guide) in ANALYTIC:
        reference = gaussian_kl(q, p)
        spread = monte_carlo_kl(q, p, draws=2000)[1]
        assert terms.kl == pytest.approx(reference.mean().item(), rel=1e-4)  # the closed form, recorded
    else:
        reference, spread = monte_carlo_kl(q, p, draws=N)
    assert reference.mean() > 0.1  # far enough from 0 that a wrong KL shows
    standard_error = (spread**2).sum().sqrt().item() / B  # of the batch mean from one draw each
    tolerance = 5 * standard_error * (1 / math.sqrt(L) + 1 / math.sqrt(N)) + 1e-4
    assert kl_in_loss == pytest.approx(reference.mean().item(), abs=tolerance)
    assert terms.kl == pytest.approx(reference.mean().item(), abs=tolerance)


@pytest.mark.parametrize("prior, guide", ANALYTIC)
def test_meanfield_uses_the_closed_form(prior, guide):
    module, batch = make_module(L=3, M=2, elbo="meanfield", prior=prior, guide=guide), make_batch()
    module.eval()
    p, q = prior_and_posterior(module, batch)
    beta = 0.7
    loss, terms = module(batch, beta)
    kl = gaussian_kl(q, p).mean().item()
    assert terms.loss - terms.image_nll - terms.text_nll == pytest.approx(beta * kl, abs=1e-4)  # no sampling noise
    assert terms.kl == pytest.approx(kl, rel=1e-4)


@pytest.mark.parametrize("prior, guide", NOT_ANALYTIC)
def test_meanfield_refuses_pairings_without_a_closed_form(prior, guide):
    module = make_module(prior=prior, guide=guide)
    nets = (module.guide.posterior_net, module.model.prior_net, HID, FEAT)
    assert not kl_pairing(*nets)["analytic"]
    with pytest.raises(ConfigError, match=r"^inference.elbo: meanfield needs an analytic KL\(q \|\| p\), and there "
                                          r"is none for q = .*; use elbo: trace \(Monte Carlo KL\)$"):
        require_analytic_kl("meanfield", *nets)


@pytest.mark.parametrize("prior, guide", ANALYTIC)
def test_meanfield_accepts_pairings_with_a_closed_form(prior, guide):
    module = make_module(prior=prior, guide=guide)
    require_analytic_kl("meanfield", module.guide.posterior_net, module.model.prior_net, HID, FEAT)


# --------------------------------------------------------------------------- log densities by hand


def test_mixture_log_density_by_hand():
    net = build_family("prior", "mixture", FEAT, Z, [8, 8], 0.0, {"components": 3})
    K = 3  # the MLP's raw output, split as the family documents it: logits, locs, raw scales
    logits, loc, raw = net.net(features()).split([K, K * Z, K * Z], dim=-1)
    loc, scale = loc.unflatten(-1, (K, Z)), torch.nn.functional.softplus(raw.unflatten(-1, (K, Z))) + 1e-4
    d = net(features())
    z = d.sample((50,))
    by_hand = torch.logsumexp(torch.log_softmax(logits, -1) + normal_log_density(z.unsqueeze(-2), loc, scale), -1)
    assert d.log_prob(z).detach() == pytest.approx(by_hand.detach(), abs=1e-5)


@pytest.mark.parametrize("kind, transform", [("prior", "affine_coupling"), ("prior", "spline"),
                                             ("guide", "affine_autoregressive")])
def test_flow_log_density_is_the_change_of_variables(kind, transform):
    net = build_family(kind, "flow", FEAT, Z, [8, 8], 0.0, {"transform": transform, "layers": 2})
    with torch.no_grad():  # the flows start near the identity: push the output layers away from it
        for p in net.flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    d = net(features())
    flow = functools.partial(functools.reduce, lambda v, t: t(v), d.transforms)
    x = d.base_dist.sample()
    jacobian = torch.autograd.functional.jacobian(flow, x)  # (B, D, B, D): block-diagonal over the batch
    blocks = jacobian[torch.arange(B), :, torch.arange(B), :]
    by_hand = d.base_dist.log_prob(x) - torch.linalg.slogdet(blocks).logabsdet
    z = flow(x).detach().clone()  # a fresh tensor: no cached inverse
    assert blocks.det().abs().log().std() > 0.01  # a Jacobian that is not the identity's
    assert d.log_prob(z).detach() == pytest.approx(by_hand.detach(), abs=1e-4)


# --------------------------------------------------------------------------- the mixture prior's draws


def test_mixture_draws_follow_the_mixture():
    p = build_family("prior", "mixture", FEAT, Z, [8, 8], 0.0, {"components": 3})(features())
    N = 200_000
    z, score = draw(p, N)
    w = p.mixture_distribution.probs.detach()  # (B, K)
    loc, scale = p.component_distribution.base_dist.loc.detach(), p.component_distribution.base_dist.scale.detach()
    mean = (w.unsqueeze(-1) * loc).sum(-2)
    variance = (w.unsqueeze(-1) * (scale**2 + loc**2)).sum(-2) - mean**2
    assert z.shape == (N, B, Z) and score.shape == (N, B)
    assert z.mean(0).detach() == pytest.approx(mean, abs=5 * variance.max().sqrt().item() / math.sqrt(N))
    assert z.var(0).detach() == pytest.approx(variance, rel=0.03)
    # the score is log w_k of the drawn component: its mean is minus the entropy of the weights
    assert score.mean(0).detach() == pytest.approx((w * w.log()).sum(-1), abs=0.02)


def test_mixture_prior_gradient_is_unbiased_and_reaches_the_weights():
    module, batch = make_module(prior="mixture"), make_batch()
    model, x = module.model, batch.images
    params = dict(model.prior_net.named_parameters())

    def f(z):  # log p(y | x_I, z) summed over the batch, for z (..., B, D)
        return torch.distributions.Bernoulli(logits=model.class_logits(z, x)).log_prob(batch.labels).sum(-1)

    p = model.prior(x)
    N = 100_000
    # Reference: sum_k w_k E_eps[f(loc_k + scale_k eps)], enumerating the components (pathwise in each).
    w = p.mixture_distribution.probs
    loc, scale = p.component_distribution.base_dist.loc, p.component_distribution.base_dist.scale  # (B, K, D)
    eps = torch.randn(N, 1, 1, Z)
    per_component = f((loc + scale * eps).transpose(-2, -3)).mean(0)  # (K, B)
    reference = torch.autograd.grad((w.T * per_component).sum(), list(params.values()), retain_graph=True)
    z, score = draw(p, N)
    estimate = torch.autograd.grad(monte_carlo_mean(f(z), score).sum(), list(params.values()), retain_graph=True)
    pathwise_only = torch.autograd.grad(monte_carlo_mean(f(z), None).sum(), list(params.values()), allow_unused=True)
    K = p.mixture_distribution.logits.shape[-1]
    for (name, _), g_ref, g_est, g_path in zip(params.items(), reference, estimate, pathwise_only):
        assert (g_est - g_ref).norm() < 0.1 * g_ref.norm() + 1e-3, name
        if name.startswith("head."):  # the first K outputs of the head are the mixing logits
            assert g_ref[:K].norm() > 0.05  # the weights matter ...
            assert g_path is None or g_path[:K].abs().max() == 0  # ... and only the score term reaches them
            assert (g_est[:K] - g_ref[:K]).norm() < 0.2 * g_ref[:K].norm()


def test_score_function_fallback_without_any_rsample():
    class NoRsampleNormal(dist.Normal):
        has_rsample = False

    loc = torch.tensor([0.3, -0.2], requires_grad=True)
    scale = torch.tensor([0.5, 1.5], requires_grad=True)
    c = torch.tensor([1.0, 0.5])
    z, score = draw(NoRsampleNormal(loc, scale).to_event(1), 400_000)
    assert not z.requires_grad and score.requires_grad
    values = -((z - c) ** 2).sum(-1)  # E = -sum((loc - c)^2 + scale^2)
    surrogate = monte_carlo_mean(values, score)
    assert surrogate.item() == pytest.approx(values.mean().item(), abs=1e-4)  # the value is the plain mean
    g_loc, g_scale = torch.autograd.grad(surrogate, (loc, scale))
    assert g_loc == pytest.approx(-2 * (loc - c).detach(), abs=0.03)
    assert g_scale == pytest.approx(-2 * scale.detach(), abs=0.05)


# --------------------------------------------------------------------------- Algorithm 2 with every prior


@pytest.mark.parametrize("prior", list(PRIORS) + [STUDENT])
def test_algorithm_2_samples_every_prior(prior):
    module, batch = make_module(prior=prior), make_batch()
    module.eval()
    S = 4000
    probs = module.predict(batch.images, S)
    assert probs.shape == (S, B, C) and probs.min() >= 0 and probs.max() <= 1
    with torch.no_grad():
        z = module.model.prior(batch.images).sample((20_000,))
        expected = torch.sigmoid(module.model.class_logits(z, batch.images)).mean(0)
    assert probs.mean(0) == pytest.approx(expected, abs=0.02)
    assert probs.std(0).max() > 0


# --------------------------------------------------------------------------- custom families through build_module


def tiny_config(**model):
    return config_from_dict({
        "data": {"image_size": 16},
        "image_encoder": {"name": "small_cnn", "width": 2, "out_features": 8},
        "model": {"z_dim": Z, "hidden": [8], "dropout": 0.0, **model},
    })


def tiny_batch(width=8):
    g = torch.Generator().manual_seed(2)
    return Batch(images=torch.rand(B, 1, 16, 16, generator=g), labels=(torch.rand(B, C, generator=g) < 0.3).float(),
                 index=torch.arange(B), token_states=torch.randn(B, T, width, generator=g),
                 token_mask=torch.ones(B, T, dtype=torch.bool))


DIMS = {"hidden_size": 8, "num_heads": 2, "intermediate_size": 16}


def test_custom_guide_and_prior_by_import_path_are_built_and_train():
    config = tiny_config(prior=STUDENT, guide=TEMPERED, guide_options={"log_temperature": -0.5})
    module = build_module(config, DIMS)
    guide_net, prior_net = module.guide.posterior_net, module.model.prior_net
    assert isinstance(guide_net, TemperedNormalPosterior) and isinstance(prior_net, StudentTPrior)
    assert guide_net.log_temperature.item() == -0.5
    assert "guide.posterior_net.log_temperature" in module.state_dict()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    loss, terms = module(tiny_batch(), 0.5)
    loss.backward()
    assert math.isfinite(loss.item()) and terms.kl != 0
    assert guide_net.log_temperature.grad.abs() > 0
    optimizer.step()
    assert guide_net.log_temperature.item() != -0.5


def test_build_module_refuses_meanfield_without_a_closed_form():
    config = tiny_config(prior=STUDENT)
    config.inference.elbo = "meanfield"
    with pytest.raises(ConfigError, match=r"^inference.elbo: meanfield needs an analytic KL.*q = Independent "
                                          r"\(DiagonalNormal\) and p = Independent \(StudentTPrior\)"):
        build_module(config, DIMS)
    config = tiny_config(prior="lowrank", guide="lowrank", prior_options={"rank": 2}, guide_options={"rank": 1})
    config.inference.elbo = "meanfield"
    module = build_module(config, DIMS)
    loss, terms = module(tiny_batch(), 0.5)
    assert math.isfinite(loss.item()) and terms.kl > 0
