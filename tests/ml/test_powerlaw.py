"""The power-law fit of learning curves on points with a known law (noise, a small-data region, a floor):
the law and its intervals recovered, predictions and sizes with intervals, refusals with reasons."""

import math

import numpy as np
import pytest

from tensorgrid.errors import CurveFitError
from tensorgrid.ml.powerlaw import PowerLaw, fit_power_law

SIZES = [100, 200, 400, 800, 1600, 3200, 6400]


def _points(alpha=2.0, beta=-0.35, gamma=0.02, noise=0.03, repeats=3, sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [list((alpha * m ** beta + gamma) * np.exp(rng.normal(0, noise, repeats))) for m in sizes]


def test_a_known_law_is_recovered_and_its_intervals_hold_the_truth_about_as_often_as_they_say():
    truth = 2.0 * 20_000 ** -0.35 + 0.02  # 3x beyond the largest size measured
    beta_in = value_in = size_in = 0
    for seed in range(20):
        law = fit_power_law(SIZES, _points(seed=seed), bootstrap=200, seed=seed)
        lo, hi = law.beta_interval
        beta_in += lo <= -0.35 <= hi
        value, lo, hi = law.predict(20_000)
        value_in += lo <= truth <= hi
        m, mlo, mhi = law.size_for(truth)
        size_in += mlo <= 20_000 <= mhi
        assert abs(value - truth) / truth < 0.15 and law.small_data == [] and law.log_rms < 0.05
    assert beta_in >= 16 and value_in >= 16 and size_in >= 16  # 95% intervals: at least 80% of 20 runs


def test_the_small_data_region_is_left_out():
    # the law says more than a guess's error at the smallest sizes: there the error stays near the guess
    points = [[min(0.9, e) for e in run] for run in _points(alpha=20, beta=-0.5, noise=0.02)]
    law = fit_power_law(SIZES, points)
    assert law.small_data[:2] == [100, 200] and law.sizes == SIZES[len(law.small_data):]
    assert law.beta_interval[0] <= -0.5 <= law.beta_interval[1]


def test_an_error_below_the_floor_is_unreachable():
    law = fit_power_law(SIZES, _points(gamma=0.05, noise=0.01))
    with pytest.raises(CurveFitError, match="unreachable.*floor"):
        law.size_for(law.gamma * 0.9)
    assert math.isfinite(law.size_for(law.gamma * 1.5)[0])


def test_it_saves_and_loads():
    law = fit_power_law(SIZES, _points())
    back = PowerLaw.from_dict(law.to_dict())
    assert back.predict(10_000) == law.predict(10_000) and back.beta_interval == law.beta_interval


@pytest.mark.parametrize("sizes, errors, message", [
    (SIZES[:3], _points(sizes=SIZES[:3]), "at least 4"),
    (SIZES, list(reversed(_points())), "does not fall"),
    (SIZES, [[0.3, 0.31, 0.29]] * len(SIZES), "does not fall"),
    (SIZES, [[0.5], [0.1], [0.45], [0.05], [0.4], [0.02], [0.3]], "does not (fall|follow)"),
    (list(reversed(SIZES)), _points(), "increasing"),
    (SIZES, _points()[:-1], "7 sizes but 6"),
    (SIZES, [[0.5]] * 6 + [[float("nan")]], "finite"),
    (SIZES, [[0.5], [0.4], [0.3], [0.2], [0.1], [0.05], [0.0]], "an error of 0"),
])
def test_points_without_a_power_law_are_refused_with_the_reason(sizes, errors, message):
    with pytest.raises(CurveFitError, match=message):
        fit_power_law(sizes, errors)
