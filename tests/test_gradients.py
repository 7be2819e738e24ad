"""`vkd-pyro gradients` (vkd_pyro.analysis.gradients): the statistics pinned on a linear-Gaussian
estimator whose variance is known in closed form and on constructed cases with known answers, and the
command end to end on the tiny demo configuration (a config's initialisation, a trained run's
checkpoints, and the one-line refusals)."""

import csv
import math

import pytest
import torch

from tests.tiny_runs import tiny_overrides
from vkd_pyro.analysis.gradients import GROUPS, gradient_statistics, term_statistics
from vkd_pyro.cli import main
from vkd_pyro.config import config_from_dict
from vkd_pyro.training.loop import fit

SIGMA, A, MU, P, R = 0.7, 1.5, 0.5, 64, 4000


def reparameterised_draws(L: int, seed: int = 0) -> torch.Tensor:
    """R estimates (R, P) of d/dmu E_q[-(z - a)^2 / 2] with q = N(mu, sigma^2), each the average over L
    reparameterised draws z = mu + sigma eps: g = -(mu + sigma eps - a) averaged over the L eps, so
    E[g] = a - mu and Var[g] = sigma^2 / L exactly; P independent copies make the group."""
    eps = torch.randn(R, L, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return -(MU + SIGMA * eps - A).mean(1)


def expected_chi(k: int) -> float:
    """E[chi_k] = sqrt(2) Gamma((k + 1) / 2) / Gamma(k / 2)."""
    return math.sqrt(2) * math.exp(math.lgamma((k + 1) / 2) - math.lgamma(k / 2))


@pytest.fixture(scope="module")
def linear_gaussian():
    return {L: gradient_statistics({"mu": reparameterised_draws(L, seed=L)})["mu"] for L in (1, 4, 16)}


def test_the_variance_is_sigma_squared_over_L(linear_gaussian):
    """Var[g] = sigma^2 / L per parameter; the mean of P sample variances (ddof = 1) has a relative sd
    of sqrt(2 / ((R - 1) P)) (chi-square), 0.28% here: 4 sd as the tolerance."""
    tolerance = 4 * math.sqrt(2 / ((R - 1) * P))
    for L, stats in linear_gaussian.items():
        assert stats["parameters"] == P
        assert stats["variance_mean"] == pytest.approx(SIGMA**2 / L, rel=tolerance)
        assert stats["variance"] == pytest.approx(P * SIGMA**2 / L, rel=tolerance)
        assert stats["variance_mean"] <= stats["variance_max"] < 1.2 * SIGMA**2 / L
    assert linear_gaussian[1]["variance"] / linear_gaussian[4]["variance"] == pytest.approx(4, rel=2 * tolerance)
    assert linear_gaussian[4]["variance"] / linear_gaussian[16]["variance"] == pytest.approx(4, rel=2 * tolerance)


def test_the_snr_grows_as_sqrt_L(linear_gaussian):
    """SNR = |a - mu| / (sigma / sqrt(L)) for every parameter."""
    for L, stats in linear_gaussian.items():
        assert stats["snr_median"] == pytest.approx(abs(A - MU) * math.sqrt(L) / SIGMA, rel=0.02)
        assert stats["snr_p10"] < stats["snr_median"] < stats["snr_p90"]
    assert linear_gaussian[16]["snr_median"] / linear_gaussian[1]["snr_median"] == pytest.approx(4, rel=0.03)


def test_the_directional_snr_of_isotropic_noise(linear_gaussian):
    """g = m + noise, noise ~ N(0, sigma^2 / L I_P), m = (a - mu) 1: ||g_par|| ~ ||m|| = |a - mu| sqrt(P)
    (the noise along u is small beside it) and ||g_perp|| ~ sigma / sqrt(L) chi_{P-1}."""
    for L, stats in linear_gaussian.items():
        expected = abs(A - MU) * math.sqrt(P) / (SIGMA / math.sqrt(L) * expected_chi(P - 1))
        assert stats["dsnr"] == pytest.approx(expected, rel=0.01)


def test_dsnr_and_cosine_on_constructed_draws():
    """Draws (1, +-s) and (3, +-2s): mean (2, 0), so ||g_par|| = 1, 1, 3, 3 and ||g_perp|| = s, s, 2s, 2s
    and DSNR = 2 / 1.5s (a ratio of means, not the mean 1.25 / s of the ratios)."""
    s = 0.25
    draws = torch.tensor([[1.0, s], [1.0, -s], [3.0, 2 * s], [3.0, -2 * s]])
    stats = gradient_statistics({"g": draws}, {"g": torch.tensor([2.0, 0.0])})["g"]
    assert stats["dsnr"] == pytest.approx(2 / (1.5 * s))
    cosines = torch.tensor([1 / math.sqrt(1 + s**2)] * 2 + [3 / math.sqrt(9 + 4 * s**2)] * 2, dtype=torch.float64)
    assert stats["cosine_mean"] == pytest.approx(float(cosines.mean()))
    assert stats["cosine_sd"] == pytest.approx(float(cosines.std()))
    assert stats["variance"] == pytest.approx(4 / 3 + 10 * s**2 / 3)  # ddof = 1 over the 4 draws
    assert stats["variance_max"] == pytest.approx(4 / 3)
    assert stats["variance_mean"] == pytest.approx(stats["variance"] / 2)
    opposite = gradient_statistics({"g": draws}, {"g": torch.tensor([-1.0, 0.0])})["g"]
    assert opposite["cosine_mean"] == pytest.approx(-float(cosines.mean()))


def test_draws_equal_to_their_mean():
    """No noise: variance 0, cosine 1 to the mean, infinite SNR and DSNR; a parameter whose gradient is
    always 0 is left out of the SNR; without a reference the cosine is NaN."""
    draws = torch.tensor([[3.0, -4.0, 0.0]]).repeat(5, 1)
    stats = gradient_statistics({"g": draws}, {"g": draws[0]})["g"]
    assert stats["variance"] == 0 and stats["variance_max"] == 0
    assert stats["cosine_mean"] == pytest.approx(1) and stats["cosine_sd"] == pytest.approx(0)
    assert stats["snr_median"] == stats["snr_p10"] == stats["snr_p90"] == math.inf and stats["dsnr"] == math.inf
    no_reference = gradient_statistics({"g": draws})["g"]
    assert math.isnan(no_reference["cosine_mean"])
    mixed = gradient_statistics({"g": torch.tensor([[1.0, 0.0], [3.0, 0.0]])})["g"]
    assert mixed["snr_median"] == pytest.approx(2 / math.sqrt(2))  # |mean 2| / sd sqrt(2); the zero column left out
    with pytest.raises(ValueError, match="R >= 2"):
        gradient_statistics({"g": draws[:1]})


def test_term_statistics():
    assert term_statistics({"kl": [1.0, 3.0]}) == {"kl_mean": 2.0, "kl_sd": pytest.approx(math.sqrt(2))}


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    torch.set_num_threads(1)
    return tmp_path_factory.getbasetemp() / "objectives-cache"


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


VKD_GROUPS = set(GROUPS)  # vkd has all six


def test_a_grid_of_sample_counts_at_a_configs_initialisation(cache, tmp_path, capsys):
    out = tmp_path / "grad"
    code = main(["gradients", "--config", "configs/demo.yaml", "--grid", "inference.num_particles=1,4", "--grid",
                 "inference.prior_samples=1,4", "--repeats", "4", "--batches", "1", "--out", str(out),
                 *tiny_overrides(), f"cache_dir={cache}"])
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"wrote {out / 'gradients.csv'}, gradients.md, gradients.png"
    assert all((out / name).stat().st_size > 0 for name in ("gradients.csv", "gradients.md", "gradients.png"))
    rows = read_rows(out / "gradients.csv")
    assert list(rows[0])[:4] == ["weights", "inference.num_particles", "inference.prior_samples", "group"]
    assert {"loss_mean", "loss_sd", "kl_mean", "kl_sd", "snr_median", "dsnr", "variance", "cosine_mean",
            "ms_per_gradient", "peak_mb", "efficiency"} <= set(rows[0])
    assert len(rows) == 4 * len(VKD_GROUPS)
    points = {(r["inference.num_particles"], r["inference.prior_samples"]) for r in rows}
    assert points == {("1", "1"), ("1", "4"), ("4", "1"), ("4", "4")}
    for point in points:
        assert {r["group"] for r in rows if (r["inference.num_particles"], r["inference.prior_samples"]) == point
                } == VKD_GROUPS
    for r in rows:
        assert r["weights"] == "init" and "saved_tensors_hooks" in r["peak_mb_measure"]
        for column in ("snr_median", "dsnr", "variance", "cosine_mean", "loss_mean", "ms_per_gradient", "peak_mb",
                       "efficiency"):
            value = float(r[column])
            assert math.isfinite(value) and value >= (-1 if column == "cosine_mean" else 0), column
        assert float(r["snr_p10"]) <= float(r["snr_median"]) <= float(r["snr_p90"])
    # Repeat r draws with seed r in every setting, and z_T is drawn before the M prior samples: at a
    # given L the guide's gradients do not depend on M.
    for group in ("guide.posterior_net", "guide.text_head", "model.text_classifier"):
        variance = {(r["inference.num_particles"], r["inference.prior_samples"]): float(r["variance"])
                    for r in rows if r["group"] == group}
        assert variance[("1", "1")] == pytest.approx(variance[("1", "4")], rel=1e-5)
        assert variance[("4", "1")] == pytest.approx(variance[("4", "4")], rel=1e-5)
    text = (out / "gradients.md").read_text()
    assert "\n".join(printed).count("## init weights") == 1 and "## init weights" in text
    for phrase in ("R = 4", "K = 1", "batches of 16", "beta = 1", "eval mode",
                   "inference.num_particles=64, inference.prior_samples=64", "saved_tensors_hooks"):
        assert phrase in text, phrase


@pytest.fixture(scope="module")
def trained_run(cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("grad-run") / "run"
    fit(config_from_dict({}, "tiny", tiny_overrides() + [f"cache_dir={cache}"]), folder, progress=False)
    return folder


def gradients_of_run(folder, out, *options):
    return main(["gradients", "--run", str(folder), "--grid", "inference.num_particles=1,2", "--repeats", "3",
                 "--batches", "2", "--reference-repeats", "2", "--reference-samples", "4", "--out", str(out),
                 *options])


def test_a_trained_run_at_its_initialisation_and_trained(trained_run, tmp_path, capsys):
    assert gradients_of_run(trained_run, tmp_path / "both", "--at", "init,trained") == 0
    rows = read_rows(tmp_path / "both" / "gradients.csv")
    assert len(rows) == 2 * 2 * len(VKD_GROUPS)
    assert [r["weights"] for r in rows[::2 * len(VKD_GROUPS)]] == ["init", "trained"]
    loss = {(r["weights"], r["inference.num_particles"]): r["loss_mean"] for r in rows}
    assert loss[("init", "1")] != loss[("trained", "1")]
    text = (tmp_path / "both" / "gradients.md").read_text()
    assert "## init weights" in text and "## trained weights" in text and str(trained_run / "checkpoint.pt") in text
    assert "inference.num_particles=4, inference.prior_samples=4" in text  # the reference: at least 4 of each

    # One epoch: last.pt holds the same weights as checkpoint.pt, and the same seeds give the same estimates.
    assert gradients_of_run(trained_run, tmp_path / "last", "--checkpoint", "last") == 0
    last = read_rows(tmp_path / "last" / "gradients.csv")
    assert str(trained_run / "last.pt") in (tmp_path / "last" / "gradients.md").read_text()
    trained = [r for r in rows if r["weights"] == "trained"]
    for a, b in zip(trained, last, strict=True):
        assert (a["group"], a["variance"], a["loss_mean"], a["cosine_mean"]) == (
            b["group"], b["variance"], b["loss_mean"], b["cosine_mean"])


@pytest.mark.parametrize("argv, message", [
    (["--out", "x"], "gradients: give --run DIR (a trained run) and/or --config FILE"),
    (["--config", "configs/demo.yaml", "--repeats", "1", "--out", "x"], "--repeats: must be >= 2, got 1"),
    (["--config", "configs/demo.yaml", "--batches", "0", "--out", "x"], "--batches: must be >= 1, got 0"),
    (["--config", "configs/demo.yaml", "--at", "init,best", "--out", "x"], "--at init,best: 'best' is not one of"),
    (["--config", "configs/demo.yaml", "--at", "trained", "--out", "x"], "--at trained: needs --run DIR"),
    (["--config", "configs/demo.yaml", "--grid", "inference.num_particle=1,2", "--out", "x"],
     "configs/demo.yaml: inference.num_particle: unknown key"),
    (["--config", "configs/demo.yaml", "--grid", "data.image_size=32,64", "--out", "x"],
     "--grid data.image_size: the settings share the same K batches"),
])
def test_user_mistakes_are_one_line(argv, message, capsys):
    assert main(["gradients", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vkd-pyro: error: ") and message in err[0], err


def test_weights_that_do_not_fit_a_setting_are_refused_naming_the_key(cache, tmp_path, capsys):
    code = main(["gradients", "--config", "configs/demo.yaml", "--grid", "model.z_dim=16,8", "--repeats", "2",
                 "--batches", "1", "--out", str(tmp_path / "g"), *tiny_overrides(), f"cache_dir={cache}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vkd-pyro: error: model.z_dim: the init weights"), err
    assert not (tmp_path / "g").exists()  # nothing written
