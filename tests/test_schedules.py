"""KL annealing, value for value: Eq. 9 (cyclical, linear or sigmoid ramp), monotonic, constant, none."""

import math

import pyro
import pyro.distributions as dist
import pytest
from pyro import poutine

from vkd_pyro.config import AnnealingConfig, config_from_dict
from vkd_pyro.errors import ConfigError
from vkd_pyro.inference.schedules import KLSchedule, cyclical_beta, monotonic_beta, sigmoid_ramp
from vkd_pyro.models.vkd import kl_weighted


def test_eq9_with_whole_cycles():
    # T = 16 iterations, C = 4 cycles of 4, R = 0.5: tau = 0, .25, .5, .75 -> beta = 0, .5, 1, 1
    assert [cyclical_beta(t, 16, 4, 0.5) for t in range(1, 17)] == [0.0, 0.5, 1.0, 1.0] * 4


def test_eq9_with_a_fractional_period():
    # T = 10, C = 4: T/C = 2.5, ceil = 3; tau = mod(t-1, 3) / 2.5 = 0, .4, .8; g(tau) = tau / .5
    expected = [0.0, 0.8, 1.0, 0.0, 0.8, 1.0, 0.0, 0.8, 1.0, 0.0]
    assert [cyclical_beta(t, 10, 4, 0.5) for t in range(1, 11)] == pytest.approx(expected)


def test_eq9_other_grade():
    # R = 0.25, T = 8, C = 1: tau = (t-1)/8; beta = tau/.25 up to tau = .25, then 1
    assert [cyclical_beta(t, 8, 1, 0.25) for t in range(1, 9)] == pytest.approx([0, .5, 1, 1, 1, 1, 1, 1])


def test_schedule_from_config():
    cyclical = KLSchedule(AnnealingConfig(schedule="cyclical", R=0.5, C=4), 16)
    constant = KLSchedule(AnnealingConfig(schedule="constant", beta=0.25), 16)
    assert [cyclical(t) for t in range(1, 5)] == [0.0, 0.5, 1.0, 1.0]
    assert {constant(t) for t in range(1, 17)} == {0.25}


def test_eq9_with_fewer_iterations_than_cycles_never_weights_the_kl_and_says_so():
    few = KLSchedule(AnnealingConfig(schedule="cyclical", R=0.5, C=4), 4)
    assert [few(t) for t in range(1, 5)] == [0.0] * 4  # ceil(T / C) = 1: tau = 0 at every step
    assert "C = 4" in few.warning() and "beta at 0" in few.warning()
    enough = KLSchedule(AnnealingConfig(schedule="cyclical", R=0.5, C=4), 5)
    assert max(enough(t) for t in range(1, 6)) == 1.0 and enough.warning() is None
    assert KLSchedule(AnnealingConfig(schedule="none"), 1).warning() is None


def test_iterations_count_from_one():
    with pytest.raises(ValueError):
        cyclical_beta(0, 10)


# --------------------------------------------------------------------------- the ramps g, monotonic, none


def logistic_by_hand(u, k=10.0):
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    return (s(k * (u - 0.5)) - s(-k / 2)) / (s(k / 2) - s(-k / 2))


def test_sigmoid_ramp_ends_exactly_at_0_and_1_and_is_a_rescaled_logistic():
    assert sigmoid_ramp(0.0) == 0.0 and sigmoid_ramp(1.0) == pytest.approx(1.0, abs=1e-12)
    assert sigmoid_ramp(0.5) == pytest.approx(0.5)
    us = [i / 20 for i in range(21)]
    values = [sigmoid_ramp(u) for u in us]
    assert values == pytest.approx([logistic_by_hand(u) for u in us])
    assert all(a < b for a, b in zip(values, values[1:]))  # increasing
    assert sigmoid_ramp(0.1) < 0.1 * 0.5 and sigmoid_ramp(0.9) > 1 - 0.1 * 0.5  # flat ends: an S, not a line


def test_eq9_with_the_sigmoid_ramp():
    # T = 16, C = 4, R = 0.5: tau = 0, .25, .5, .75 -> beta = g(0), g(.5), g(1), 1
    expected = [0.0, logistic_by_hand(0.5), logistic_by_hand(1.0), 1.0] * 4
    assert [cyclical_beta(t, 16, 4, 0.5, "sigmoid") for t in range(1, 17)] == pytest.approx(expected)
    # R = 0.8, T = 10, C = 1: tau = (t-1)/10 -> g(tau / .8) up to tau = .8, then 1
    expected = [logistic_by_hand((t - 1) / 10 / 0.8) if (t - 1) / 10 <= 0.8 else 1.0 for t in range(1, 11)]
    assert [cyclical_beta(t, 10, 1, 0.8, "sigmoid") for t in range(1, 11)] == pytest.approx(expected)


def test_monotonic_rises_over_the_warmup_epochs_then_stays_1():
    # T = 4 iterations an epoch, W = 2 epochs: beta_s = (s - 1) / 8 for global step s, then 1
    schedule = KLSchedule(AnnealingConfig(schedule="monotonic", warmup_epochs=2), 4)
    values = [schedule(t, epoch) for epoch in (1, 2, 3) for t in range(1, 5)]
    assert values == pytest.approx([0, .125, .25, .375, .5, .625, .75, .875, 1, 1, 1, 1])
    half = KLSchedule(AnnealingConfig(schedule="monotonic", warmup_epochs=0.5), 4)  # over 2 steps
    assert [half(t, e) for e in (1, 2) for t in range(1, 5)] == pytest.approx([0, .5, 1, 1, 1, 1, 1, 1])
    sigmoid = KLSchedule(AnnealingConfig(schedule="monotonic", warmup_epochs=1, g="sigmoid"), 4)
    assert [sigmoid(t, 1) for t in range(1, 5)] + [sigmoid(1, 2)] == pytest.approx(
        [logistic_by_hand(u) for u in (0, .25, .5, .75)] + [1.0])
    assert monotonic_beta(9, 8) == 1.0 and monotonic_beta(1, 8) == 0.0
    with pytest.raises(ValueError):
        monotonic_beta(0, 8)


def test_none_is_always_1_and_constant_its_value():
    none = KLSchedule(AnnealingConfig(schedule="none", beta=0.1), 5)
    assert {none(t, e) for e in (1, 7) for t in range(1, 6)} == {1.0}
    constant = KLSchedule(AnnealingConfig(schedule="constant", beta=0.1), 5)
    assert {constant(t, e) for e in (1, 7) for t in range(1, 6)} == {0.1}
    cyclical = KLSchedule(AnnealingConfig(schedule="cyclical", R=0.5, C=4), 16)
    assert [cyclical(t, 3) for t in range(1, 5)] == [0.0, 0.5, 1.0, 1.0]  # the same in every epoch


def test_annealing_config_keys():
    a = config_from_dict({}, overrides=["inference.annealing.schedule=monotonic", "inference.annealing.g=sigmoid",
                                        "inference.annealing.warmup_epochs=2.5"]).inference.annealing
    assert (a.schedule, a.g, a.warmup_epochs) == ("monotonic", "sigmoid", 2.5)
    d = config_from_dict({}).inference.annealing
    assert (d.schedule, d.g, d.warmup_epochs) == ("cyclical", "linear", 5.0)
    for override, message in [
        ("inference.annealing.g=cosine", "inference.annealing.g: 'cosine' must be one of linear, sigmoid"),
        ("inference.annealing.schedule=warm", "must be one of cyclical, monotonic, constant, none"),
        ("inference.annealing.warmup_epochs=0", "inference.annealing.warmup_epochs: 0.0 must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            config_from_dict({}, overrides=[override])


def test_kl_weight_handler():
    def site_scale(beta):
        with poutine.trace() as tr, kl_weighted(beta):
            pyro.sample("z", dist.Normal(0.0, 1.0))
        return tr.trace.nodes["z"]

    assert site_scale(0.5)["scale"] == 0.5
    assert site_scale(0.0)["mask"] is False  # a float 0: masked out (Pyro's scale refuses 0)
    with pytest.raises(ValueError):
        kl_weighted(-0.1)


def test_beta_max_scales_every_ramp_and_leaves_the_constant_alone():
    T = 16
    for schedule in ("cyclical", "monotonic", "none"):
        full = KLSchedule(AnnealingConfig(schedule=schedule, warmup_epochs=2), T)
        capped = KLSchedule(AnnealingConfig(schedule=schedule, warmup_epochs=2, beta_max=0.3), T)
        for epoch in (1, 2, 3):
            for t in range(1, T + 1):
                assert capped(t, epoch) == pytest.approx(0.3 * full(t, epoch))  # Eq. 9's shape, its plateau at 0.3
    assert max(KLSchedule(AnnealingConfig(schedule="cyclical", beta_max=0.3), T)(t) for t in range(1, 17)) == 0.3
    constant = KLSchedule(AnnealingConfig(schedule="constant", beta=0.7, beta_max=0.3), T)
    assert constant(5, 2) == 0.7


def test_guide_warmup_holds_beta_at_zero_then_starts_the_schedule_afresh():
    T, W = 8, 2
    plain = KLSchedule(AnnealingConfig(schedule="monotonic", warmup_epochs=1), T)
    warm = KLSchedule(AnnealingConfig(schedule="monotonic", warmup_epochs=1), T, warmup_epochs=W)
    for epoch in (1, 2):
        assert {warm(t, epoch) for t in range(1, T + 1)} == {0.0}
    for epoch in (3, 4):
        assert [warm(t, epoch) for t in range(1, T + 1)] == [plain(t, epoch - W) for t in range(1, T + 1)]
    assert warm(1, 3) == 0.0 and warm(T, 3) == pytest.approx((T - 1) / T)  # the ramp starts at epoch W + 1
    constant = KLSchedule(AnnealingConfig(schedule="constant", beta=0.4), T, warmup_epochs=1)
    assert constant(3, 1) == 0.0 and constant(3, 2) == 0.4


def test_beta_max_and_warmup_are_validated():
    with pytest.raises(ConfigError, match=r"inference\.annealing\.beta_max: -0\.5 must be >= 0"):
        config_from_dict({}, "my.yaml", ["inference.annealing.beta_max=-0.5"])
    with pytest.raises(ConfigError, match=r"inference\.guide_warmup_epochs: expected int"):
        config_from_dict({}, "my.yaml", ["inference.guide_warmup_epochs=1.5"])
