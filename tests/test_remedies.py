"""The remedies for posterior collapse, each pinned against a hand-written computation: free bits
(Kingma et al. 2016), kl_gradient=prior, their config checks; and an end-to-end run with a weighted
KL whose history shows the KL term inside the loss."""

import csv

import pyro
import pytest
import torch

from tests.test_objective import hand_terms, make_batch, make_module
from tests.tiny_runs import tiny_overrides
from vkd_pyro.config import config_from_dict
from vkd_pyro.errors import ConfigError
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.objectives import VKD
from vkd_pyro.training.build import build_module, check_config
from vkd_pyro.training.loop import fit


def remedied(module, free_bits=0.0, kl_gradient="both"):
    """The same networks in a module with the remedies on (the KL term objective vkd gives them)."""
    config = config_from_dict({}, "remedies", [f"inference.free_bits={free_bits}", f"inference.kl_gradient={kl_gradient}"])
    return VKDModule(module.model, module.guide, elbo="trace", num_particles=module.elbo.num_particles,
                     kl=VKD(config).kl())


def kl_per_dim(mq, sq, mp, sp):
    """KL(N(mq, sq^2) || N(mp, sp^2)) per record and dimension (B, D), by its closed form, by hand."""
    return torch.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5


def hand_free_bits(module, batch, lam):
    """Kingma et al. (2016): sum_d max(lambda, mean_b KL_{b,d}) per record (the batch sum / B)."""
    hand = hand_terms(module, batch, draws=10)
    kl = kl_per_dim(*hand["posterior"], *hand["prior"])
    return torch.clamp(kl.mean(0), min=lam).sum().item(), kl.sum(-1).mean().item()


@pytest.mark.parametrize("L", [1, 3])
def test_free_bits_adds_the_clamped_per_dimension_kl_exactly(L):
    module, batch = make_module(L=L, M=2), make_batch()
    hand = hand_terms(module, batch, draws=10)
    kl = kl_per_dim(*hand["posterior"], *hand["prior"]).mean(0)
    lam = float(kl.median())  # some dimensions below lambda, some above: the clamp matters
    assert (kl < lam).any() and (kl > lam).any()
    free, unclamped = hand_free_bits(module, batch, lam)
    assert free > unclamped + 1e-3
    beta = 0.6
    loss, terms = remedied(module, free_bits=lam)(batch, beta)
    # the likelihood terms are recorded from the same draws, so the rest of the loss is the KL term exactly
    assert terms.loss - terms.image_nll - terms.text_nll == pytest.approx(beta * free, rel=1e-5)
    assert terms.kl == pytest.approx(unclamped, rel=1e-5)  # the recorded KL stays the unclamped one
    assert terms.beta == beta


def test_free_bits_above_every_dimension_leaves_the_kl_without_gradient():
    module, batch = make_module(), make_batch()
    grads = []
    for variant, beta in [(remedied(module, free_bits=1e3), 0.8), (module, 0.0)]:
        module.zero_grad()
        pyro.set_rng_seed(3)
        variant(batch, beta)[0].backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:  # a constant lambda * D: the loss moves nothing the beta = 0 loss does not
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_kl_gradient_prior_moves_the_prior_alone():
    module, batch = make_module(), make_batch()
    beta = 0.7
    grads, values = [], []
    for variant, weight in [("prior", beta), ("both", 0.0)]:
        module.zero_grad()
        pyro.set_rng_seed(5)
        loss, terms = (remedied(module, kl_gradient="prior") if variant == "prior" else module)(batch, weight)
        loss.backward()
        values.append(terms)
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    with_kl, without = grads
    hand = hand_terms(module, batch, draws=10)
    analytic = kl_per_dim(*hand["posterior"], *hand["prior"]).sum(-1).mean().item()
    assert values[0].loss - values[0].image_nll - values[0].text_nll == pytest.approx(beta * analytic, rel=1e-5)
    for name in with_kl:  # the guide and the MI head: the MI term's gradient only
        if name.startswith("guide.") or name.startswith("model.text_classifier"):
            assert torch.allclose(with_kl[name], without[name], atol=1e-6), name
    # the prior's extra gradient is beta * grad_p of the hand-written KL(q.detach() || p), per record
    prior_params = dict(module.model.prior_net.named_parameters())
    mq, sq = (t.detach() for t in hand["posterior"])
    mp, sp = module.model.prior_net.loc_scale(batch.images)
    expected = torch.autograd.grad(beta * kl_per_dim(mq, sq, mp, sp).sum(-1).mean(), list(prior_params.values()))
    for (name, _), extra in zip(prior_params.items(), expected):
        got = with_kl[f"model.prior_net.{name}"] - without[f"model.prior_net.{name}"]
        assert torch.allclose(got, extra, atol=1e-5), name
        assert extra.abs().sum() > 0


def test_remedies_refuse_families_without_a_diagonal_normal_and_objectives_without_a_kl():
    dims = {"hidden_size": 32, "num_heads": 2, "intermediate_size": 64}
    small = ["model.z_dim=4", "model.hidden=[8]", "image_encoder.width=4", "image_encoder.out_features=8"]
    config = config_from_dict({}, "my.yaml", small + ["inference.free_bits=0.5", "model.prior=lowrank",
                                                      "model.prior_options={rank: 2}"])
    with pytest.raises(ConfigError, match=r"^inference\.free_bits: .*model\.prior = 'lowrank'"):
        build_module(config, dims)
    config = config_from_dict({}, "my.yaml", small + ["inference.kl_gradient=prior", "model.guide=lowrank",
                                                      "model.guide_options={rank: 2}"])
    with pytest.raises(ConfigError, match=r"^inference\.kl_gradient: .*model\.guide"):
        build_module(config, dims)
    for overrides, key in [(["inference.objective=image_only", "inference.free_bits=0.1"], "inference.free_bits"),
                           (["inference.objective=kd", "inference.kd.teacher=x", "inference.kl_gradient=prior"],
                            "inference.kl_gradient"),
                           (["inference.objective=image_only", "inference.guide_warmup_epochs=2"],
                            "inference.guide_warmup_epochs"),
                           (["inference.objective=kd"], "inference.kd.teacher")]:
        with pytest.raises(ConfigError, match=rf"^{key}: "):
            check_config(config_from_dict({}, "my.yaml", overrides))
    with pytest.raises(ConfigError, match=r"inference\.kl_gradient: 'detach' must be one of both, prior"):
        config_from_dict({}, "my.yaml", ["inference.kl_gradient=detach"])


def test_the_remedies_leave_the_default_loss_untouched():
    module, batch = make_module(L=2, M=2), make_batch()
    for m in (module, remedied(module, free_bits=0.0, kl_gradient="both")):
        assert m.kl is None
    pyro.set_rng_seed(9)
    a = module(batch, 0.5)[0].item()
    pyro.set_rng_seed(9)
    b = remedied(module)(batch, 0.5)[0].item()
    assert a == b


def read_history(folder):
    with open(folder / "history.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("remedy, tolerance", [(None, 0.3), ("inference.kl_gradient=prior", 2e-3)])
def test_training_with_a_weighted_kl_puts_the_kl_term_in_the_loss(tmp_path_factory, remedy, tolerance):
    """A constant beta = 1 (the tiny runs' cyclical schedule keeps beta at 0: T <= C), L = 16 particles.
    Plain vkd: loss = image NLL + text NLL + beta KL within Monte Carlo noise (the ELBO's KL is a
    16-draw estimate, the recorded one analytic); with kl_gradient=prior the KL term is the analytic one: exact."""
    cache = tmp_path_factory.getbasetemp() / "objectives-cache"  # shared by the tiny runs of these tests
    out = tmp_path_factory.mktemp("weighted")
    overrides = tiny_overrides({"train.max_epochs": 2, "train.batch_size": 8, "inference.annealing.schedule": "constant",
                                "inference.annealing.beta": 1.0, "inference.num_particles": 16}) + [f"cache_dir={cache}"] + ([remedy] if remedy else [])
    fit(config_from_dict({}, "tiny", overrides), out, progress=False)
    history = read_history(out)
    assert len(history) == 2
    for row in history:
        assert row["beta"] == 1.0 and row["kl"] > 0.6  # beta * KL: twice the tolerance or more
        explained = row["image_nll"] + row["text_nll"] + row["beta"] * row["kl"]
        assert row["loss"] == pytest.approx(explained, abs=tolerance)  # history.csv keeps 6 digits
        assert row["loss"] - row["image_nll"] - row["text_nll"] > 0.6  # the KL term is there


def test_guide_warmup_trains_the_first_epoch_at_beta_zero(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "objectives-cache"
    out = tmp_path_factory.mktemp("warmup")
    overrides = tiny_overrides({"train.max_epochs": 2, "train.batch_size": 8, "inference.annealing.schedule": "none",
                                "inference.guide_warmup_epochs": 1}) + [f"cache_dir={cache}"]
    fit(config_from_dict({}, "tiny", overrides), out, progress=False)
    first, second = read_history(out)
    assert first["beta"] == 0.0 and first["loss"] == pytest.approx(first["image_nll"] + first["text_nll"], abs=2e-3)
    assert second["beta"] == 1.0 and second["loss"] - second["image_nll"] - second["text_nll"] > 0.3
