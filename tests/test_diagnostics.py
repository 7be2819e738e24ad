"""Diagnostics against known values: ECE by hand, importance sampling on a linear-Gaussian model,
active units on constructed means, the per-dimension KL, WordPiece merging, Grad-CAM, attention and
the TensorBoard logger. No dataset: stand-in networks from conftest."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal

from tests.conftest import FeaturesAsImages, MaskedMeanHead
from vkd_pyro.analysis.diagnostics import (
    active_units,
    collapse_report,
    diagonal_gaussian_kl,
    elbo_terms,
    expected_calibration_error,
    format_diagnostics,
    held_out_log_likelihood,
    importance_log_marginal,
    latent_statistics,
    samples_curve,
)
from vkd_pyro.analysis.figures import cls_attention, grad_cam, gradcam_layer, merge_wordpieces, primary_classes
from vkd_pyro.classes import NUM_CLASSES
from vkd_pyro.cli.analysis_commands import sample_counts
from vkd_pyro.config import config_from_dict
from vkd_pyro.data.batching import PairedSplit
from vkd_pyro.errors import UserError
from vkd_pyro.guides import EHRPosterior, NoGuide
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.inference.terms import StepTerms
from vkd_pyro.models import VKDModel
from vkd_pyro.training.logger import TrainingLogger

# --------------------------------------------------------------------------- ECE


def test_ece_matches_a_hand_computed_value():
    probs = np.array([[0.05, 0.15], [0.12, 0.85], [0.91, 0.42]])
    labels = np.array([[0, 0], [1, 1], [1, 0]])
    # 10 bins: bin0 {.05|0}: .05; bin1 {.15|0, .12|1}: 2 * |.5 - .135| = .73; bin4 {.42|0}: .42;
    # bin8 {.85|1}: .15; bin9 {.91|1}: .09. ECE = (.05 + .73 + .42 + .15 + .09) / 6 = .24
    result = expected_calibration_error(probs, labels, bins=10)
    assert result["ece"] == pytest.approx(0.24)
    assert result["pairs"] == 6 and result["bins"] == 10
    assert [b["count"] for b in result["table"]] == [1, 2, 0, 0, 1, 0, 0, 0, 1, 1]
    assert result["table"][1]["confidence"] == pytest.approx(0.135) and result["table"][1]["frequency"] == 0.5
    # One bin: |mean(y) - mean(p)| = |3/6 - 2.5/6|
    assert expected_calibration_error(probs, labels, bins=1)["ece"] == pytest.approx(0.5 / 6)


def test_ece_is_zero_when_calibrated_and_puts_one_in_the_last_bin():
    assert expected_calibration_error(np.full(8, 0.25), np.array([1, 0, 0, 0, 0, 1, 0, 0]), 10)["ece"] == pytest.approx(0.0)
    result = expected_calibration_error(np.array([1.0, 0.0]), np.array([1, 0]), 10)
    assert result["ece"] == pytest.approx(0.0)
    assert result["table"][9]["count"] == 1 and result["table"][0]["count"] == 1
    with pytest.raises(ValueError):
        expected_calibration_error(np.zeros(3), np.zeros(4))


# --------------------------------------------------------------------------- importance sampling


def _linear_gaussian(y, noise):
    """z ~ N(0, 1), y | z ~ N(z, noise^2): p(y) = N(0, 1 + noise^2), posterior N(y/(1+s2), s2/(1+s2))."""
    prior = Independent(Normal(torch.zeros(len(y), 1, dtype=torch.float64), torch.ones(len(y), 1, dtype=torch.float64)), 1)

    def log_lik(z):
        return Normal(z[..., 0], noise).log_prob(y)

    s2 = noise ** 2
    posterior = Independent(Normal((y / (1 + s2)).unsqueeze(-1), torch.full((len(y), 1), math.sqrt(s2 / (1 + s2)),
                                                                        dtype=torch.float64)), 1)
    exact = Normal(torch.zeros((), dtype=torch.float64), math.sqrt(1 + s2)).log_prob(y)
    return prior, log_lik, posterior, exact


def test_importance_sampling_is_exact_with_the_true_posterior_and_converges_otherwise():
    torch.manual_seed(0)
    y = torch.tensor([-1.0, 0.3, 2.0], dtype=torch.float64)
    prior, log_lik, posterior, exact = _linear_gaussian(y, 0.5)
    # The posterior as proposal: every weight equals p(y), for any K.
    assert torch.allclose(importance_log_marginal(log_lik, prior, posterior, num_samples=3), exact, atol=1e-9)
    # The prior as proposal (plain Monte Carlo) and a broad proposal: consistent as K grows.
    plain = importance_log_marginal(log_lik, prior, None, num_samples=100_000, chunk=25_000)
    broad = Independent(Normal(torch.zeros(3, 1, dtype=torch.float64), torch.full((3, 1), 2.0, dtype=torch.float64)), 1)
    weighted = importance_log_marginal(log_lik, prior, broad, num_samples=100_000, chunk=25_000)
    assert torch.allclose(plain, exact, atol=0.03)
    assert torch.allclose(weighted, exact, atol=0.03)
    # A wrong likelihood would not match: the test can fail.
    assert not torch.allclose(importance_log_marginal(lambda z: Normal(z[..., 0], 1.0).log_prob(y), prior, None,
                                                      num_samples=100_000, chunk=25_000), exact, atol=0.03)


def test_importance_sampling_bound_tightens_with_k():
    torch.manual_seed(1)
    y = torch.full((4000,), 2.0, dtype=torch.float64)  # many independent replicates of one estimate
    prior, log_lik, _, exact = _linear_gaussian(y, 0.5)
    means = [importance_log_marginal(log_lik, prior, None, num_samples=k).mean().item() for k in (1, 8, 64)]
    assert means[0] < means[1] < means[2] < exact[0].item() + 0.01  # E log p_K increases towards log p(y)
    assert exact[0].item() - means[2] < 0.1


def _tiny_module(features=6, hidden_text=5, z_dim=2, objective="vkd"):
    model = VKDModel(FeaturesAsImages(features), NUM_CLASSES, z_dim=z_dim, hidden=[8], dropout=0.0,
                     latent_from_guide=objective != "image_only", mutual_information=objective == "vkd")
    guide = (EHRPosterior(MaskedMeanHead(hidden_text), z_dim=z_dim, hidden=[8], dropout=0.0)
             if objective != "image_only" else NoGuide())
    return VKDModule(model, guide).eval()


def _records(n=6, features=6, hidden_text=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"img": torch.randn(features, generator=g), "lab": (torch.rand(NUM_CLASSES, generator=g) < 0.3).float(),
             "idx": i, "token_states": torch.randn(3 + i % 3, hidden_text, generator=g)} for i in range(n)]


def test_prior_and_guide_proposals_agree_on_a_small_model():
    torch.manual_seed(0)
    module = _tiny_module()
    with torch.no_grad():  # a guide broader than the prior: bounded importance weights
        module.guide.posterior_net.net.head.bias[2:].fill_(2.0)
        module.model.prior_net.net.head.bias[2:].fill_(0.0)
    split = _records(4)
    prior = held_out_log_likelihood(module, split, num_samples=20_000, proposal="prior", seed=0)
    guide = held_out_log_likelihood(module, split, num_samples=20_000, proposal="guide", seed=1)
    assert prior.shape == (4,) and np.all(prior < 0)
    np.testing.assert_allclose(prior, guide, atol=0.06)  # Monte Carlo error about 0.02 here
    with pytest.raises(ValueError):
        held_out_log_likelihood(_tiny_module(objective="image_only"), split, 4, proposal="guide")


def test_elbo_terms_at_beta_one_add_up():
    module = _tiny_module(objective="image_only")
    terms = elbo_terms(module, _records(), batch_size=4)
    assert terms["n"] == 6 and terms["beta"] == 1.0
    assert terms["loss"] == pytest.approx(terms["image_nll"]) and terms["kl"] == 0.0 and terms["text_nll"] == 0.0
    module = _tiny_module(objective="vkd")
    terms = elbo_terms(module, _records(), batch_size=4)
    assert terms["text_nll"] > 0 and terms["kl"] > 0
    assert terms == elbo_terms(module, _records(), batch_size=4)  # seeded: reproducible


# --------------------------------------------------------------------------- posterior collapse


def test_active_units_on_constructed_means():
    signs = np.tile([1.0, -1.0], 50)[:, None]  # 100 records, mean 0, variance exactly a^2 for a * signs
    scales = np.array([1.0, 0.0, math.sqrt(0.005), math.sqrt(0.05)])
    count, variance = active_units(signs * scales)
    np.testing.assert_allclose(variance, [1.0, 0.0, 0.005, 0.05])
    assert count == 2  # dimensions 0 and 3 exceed 0.01
    assert active_units(signs * scales, threshold=0.001)[0] == 3
    with pytest.raises(ValueError):
        active_units(np.zeros((1, 4)))


def test_per_dimension_kl_sums_to_the_analytic_kl():
    torch.manual_seed(0)
    q = Normal(torch.randn(5, 3), torch.rand(5, 3) + 0.2)
    p = Normal(torch.randn(5, 3), torch.rand(5, 3) + 0.2)
    per_dim = diagonal_gaussian_kl(q.loc, q.scale, p.loc, p.scale)
    torch.testing.assert_close(per_dim, torch.distributions.kl_divergence(q, p))
    module = _tiny_module(z_dim=3)
    stats = latent_statistics(module, _records(), batch_size=4)
    assert stats["guide_mean"].shape == (6, 3) and stats["prior_mean"].shape == (6, 3)
    report = collapse_report(stats)
    assert report["z_dim"] == 3 and len(report["kl_per_dim"]) == 3
    assert report["kl_total"] == pytest.approx(float(np.sum(report["kl_per_dim"])))
    assert 0 <= report["guide_active_units"] <= 3


# --------------------------------------------------------------------------- figures' pieces


def test_wordpieces_merge_into_words_with_averaged_weights():
    tokens = ["[CLS]", "pleural", "eff", "##usion", "is", "x", "##x", "##xx", ".", "[SEP]"]
    weights = [0.5, 0.1, 0.2, 0.4, 0.05, 0.03, 0.06, 0.09, 0.01, 0.2]
    words, merged = merge_wordpieces(tokens, weights)
    assert words == ["pleural", "effusion", "is", "xxxx", "."]
    np.testing.assert_allclose(merged, [0.1, 0.3, 0.05, 0.06, 0.01])
    with pytest.raises(ValueError):
        merge_wordpieces(tokens, weights[:-1])


def test_primary_class_is_the_most_frequent_positive():
    labels = np.zeros((4, NUM_CLASSES))
    labels[[0, 1, 2], 3] = 1  # class 3 three times
    labels[[0, 3], 5] = 1  # class 5 twice
    names = primary_classes(labels)
    from vkd_pyro.classes import CLASSES
    assert names == [CLASSES[3], CLASSES[3], CLASSES[3], CLASSES[5]]
    assert primary_classes(np.zeros((1, NUM_CLASSES))) == [None]


@pytest.mark.parametrize("name", ["small_cnn", "densenet121"])
def test_grad_cam_on_the_last_conv_block(name):
    from vkd_pyro.encoders.image import build_image_encoder

    torch.manual_seed(0)
    options = {"width": 4, "out_features": 16} if name == "small_cnn" else {}
    encoder = build_image_encoder(name, "none", **options)
    module = VKDModule(VKDModel(encoder, NUM_CLASSES, z_dim=4, hidden=[8], dropout=0.0,
                                latent_from_guide=False, mutual_information=False), NoGuide()).eval()
    layer = gradcam_layer(encoder)
    assert layer is (encoder.features if name == "densenet121" else encoder.features[-2])
    images = torch.rand(2, 1, 64, 64)
    cams = grad_cam(module, images, [3, 7])
    assert cams.shape == (2, 64, 64) and torch.isfinite(cams).all()
    assert cams.min() >= 0 and cams.max() <= 1 + 1e-6
    assert not layer._forward_hooks  # the hook is removed


def test_cls_attention_is_a_distribution_over_tokens():
    from vkd_pyro.encoders.text_head import TextHead

    head = TextHead(32, 2, 64, dropout=0.0, input_size=20).eval()
    weights = cls_attention(head, torch.randn(7, 20))
    assert weights.shape == (7,) and np.all(weights >= 0)
    assert weights.sum() == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------- TensorBoard


def test_training_logger_writes_step_terms_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TrainingLogger(tmp_path, tensorboard=True)
    for step in range(5):
        logger.step(StepTerms({"loss": 3.0 - step, "image_nll": 1.0, "text_nll": 1.5, "kl": 0.5 * step}, 0.25 * step))
    logger.epoch(1, {"loss": 1.0, "val_macro_auc": float("nan")})
    summary = logger.close()
    assert summary["train_steps"] == 5 and summary["steps_per_second"] > 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/loss", "step/image_nll", "step/text_nll", "step/kl", "step/beta", "epoch/loss"} <= tags
    assert "epoch/val_macro_auc" not in tags  # nan is not written
    assert [(s.step, s.value) for s in events.Scalars("step/kl")] == [(i + 1, 0.5 * i) for i in range(5)]
    off = TrainingLogger(tmp_path / "off")
    off.step(StepTerms({"loss": 1.0, "image_nll": 1.0, "text_nll": 0.0, "kl": 0.0}, 1.0))
    assert off.close()["train_steps"] == 1 and not (tmp_path / "off" / "tensorboard").exists()


def test_calibration_leaves_masked_labels_out():
    """Unknown labels (mask 0) count in no calibration figure, as in metrics.json's AUCs."""
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=(40, 14))
    labels = (rng.uniform(size=(40, 14)) < probs).astype(float)
    mask = rng.uniform(size=(40, 14)) < 0.6
    labels[~mask] = 0.0  # an unknown label is stored as 0: counted, it would be a false negative
    probs[~mask] = 0.99
    masked = expected_calibration_error(probs, labels, mask=mask)
    kept = expected_calibration_error(probs[mask], labels[mask])
    assert masked["pairs"] == int(mask.sum()) == kept["pairs"]
    assert masked["ece"] == pytest.approx(kept["ece"])
    assert expected_calibration_error(probs, labels)["ece"] > masked["ece"] + 0.1


# --------------------------------------------------------------------------- Monte Carlo error against S

CURVE = (1, 4, 16, 64, 256)


@pytest.fixture(scope="module")
def curve():
    """samples_curve (32 redraws) of a tiny module whose predictive has spread: a prior of sd ~1 on z
    (2-d) and a classifier with weights ~1.5 on z and ~1 on the features; 60 records whose labels are
    drawn from the module's own predictive, so that the macro AUC is well above 0.5."""
    torch.manual_seed(0)
    module = _tiny_module(z_dim=2)
    with torch.no_grad():
        module.model.prior_net.net.head.bias[2:].fill_(0.5)  # softplus(0.5) ~ 0.97
        module.model.classifier.weight.copy_(torch.cat([1.5 * torch.randn(NUM_CLASSES, 2),
                                                        torch.randn(NUM_CLASSES, 6)], 1))
    records = _records(60)
    with torch.no_grad():
        probs = module.predict(torch.stack([r["img"] for r in records]), 4000).mean(0)
    for record, p in zip(records, probs):
        record["lab"] = (torch.rand(NUM_CLASSES) < p).float()
    config = config_from_dict({"train": {"eval_batch_size": 32}})
    return samples_curve(module, PairedSplit(records, np.arange(60)), config, samples=CURVE, redraws=32)


def test_monte_carlo_error_falls_as_one_over_root_s(curve):
    """se(S) sqrt(S) is constant: within 7% of S = 256's from S = 16 on (0.956 to 0.999 at S = 16 and
    0.99 to 1.005 at S = 64 measured over 8 seeds of this construction; the median of an sd of 16
    Gaussian draws is 0.978 of the true sd), and at S = 1 (the sd across the 32 redraws instead: 0.98
    to 1.02 measured); below it at S = 4, where the median of an sd of 4 draws is low (0.89 for
    Gaussian draws, 0.67 to 0.83 measured)."""
    assert [row["S"] for row in curve] == list(CURVE) and all(row["redraws"] == 32 for row in curve)
    assert [row["mc_se_from"] for row in curve] == ["redraws"] + ["draws"] * 4
    scaled = {row["S"]: row["mc_se_median"] * math.sqrt(row["S"]) for row in curve}
    ratio = {S: scaled[S] / scaled[256] for S in CURVE}
    assert 0.93 < ratio[16] < 1.03 and 0.97 < ratio[64] < 1.03
    assert 0.6 < ratio[4] < 0.95
    assert 0.85 < ratio[1] < 1.1
    assert scaled[256] > 0.05  # the predictive has spread: an s.e. of 0.1 at S = 1 and more
    assert all(row["mc_se_p90"] > row["mc_se_median"] > 0 and row["seconds"] > 0 for row in curve)


def test_macro_auc_spread_over_redraws_shrinks_with_s(curve):
    """The sd of the macro AUC over 32 independent redraws: 6 to 12 times smaller at S = 256 than at
    S = 1 (measured over 8 seeds of this construction); asserted at 2 times, which 32 redraws put beyond chance (the log of an sd
    ratio from 31 degrees of freedom each varies by about 0.18)."""
    auc = {row["S"]: row for row in curve}
    assert auc[256]["macro_auc_sd"] < auc[1]["macro_auc_sd"] / 2
    assert 0.6 < auc[256]["macro_auc_mean"] < 1.0 and auc[1]["macro_auc_mean"] < auc[256]["macro_auc_mean"]


def test_samples_curve_prints_as_a_table_and_parses_from_the_command_line(curve):
    result = {"split": "test", "n": 60, "objective": "vkd", "log_p_y_given_x": {"K": 4, "prior_proposal": -3.0},
              "calibration": {"bins": 10, "pairs": 840, "S": 16, "ece": 0.05}, "latent": {}, "samples_curve": curve}
    lines = format_diagnostics(result).splitlines()
    assert "32 redraws each" in lines[4] and "MC s.e. median" in lines[5]
    assert lines[6].split()[0] == "1" and lines[6].split()[1].endswith("*")  # S = 1: from the redraws
    assert len(lines) == 6 + len(CURVE) and " ± " in lines[-1]
    assert sample_counts("1, 4,16") == (1, 4, 16) and sample_counts("") == ()
    for bad in ("0,4", "4,x", "-1"):
        with pytest.raises(UserError, match=r"^--samples-curve: "):
            sample_counts(bad)
    with pytest.raises(ValueError):
        samples_curve(_tiny_module(), _records(4), None, samples=(4,), redraws=1)
