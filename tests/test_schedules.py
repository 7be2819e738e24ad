"""Eq. 9, the cyclical KL annealing schedule, value for value."""

import pytest

from vkd_pyro.config import AnnealingConfig
from vkd_pyro.schedules import KLSchedule, cyclical_beta


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


def test_iterations_count_from_one():
    with pytest.raises(ValueError):
        cyclical_beta(0, 10)
