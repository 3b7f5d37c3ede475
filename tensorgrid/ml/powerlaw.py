"""Learning curves: the power law of generalisation error against training-set size, fitted to measured
points, and what it predicts (Hestness et al., "Deep Learning Scaling is Predictable, Empirically", 2017:
error(m) = alpha * m**beta + gamma between a small-data region and an irreducible-error floor, beta between
-0.07 and -0.35 in their domains, -0.5 in theory).

This module holds the fit (``fit_power_law``) and the fitted law (``PowerLaw``): bounded nonlinear least
squares (scipy) on the logarithm of the error, the small-data region found and left out, intervals by a
bootstrap over each size's repeated runs. A set of points that does not follow a power law (too few sizes,
an error that does not fall, a poor fit) is refused with the reason (``CurveFitError``), never fitted into
nonsense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from ..errors import CurveFitError

MIN_SIZES = 4  # fewer points cannot tell three parameters from noise
MAX_LOG_RMS = 0.15  # a fit worse than ~15% typical relative error is not a power law (refused)
LEVEL = 0.95


@dataclass
class PowerLaw:
    """error(m) = alpha * m**beta + gamma, fitted on ``sizes`` (the small-data region left out); each
    ``samples`` row is one bootstrap fit (alpha, beta, gamma), from which the intervals come."""

    alpha: float
    beta: float
    gamma: float
    sizes: list[int]
    small_data: list[int] = field(default_factory=list)  # sizes left out as the small-data region
    log_rms: float = 0.0  # the fit's RMS residual of log(error): its goodness
    samples: np.ndarray = field(default_factory=lambda: np.empty((0, 3)))

    def __call__(self, m):
        return self.alpha * np.asarray(m, dtype=float) ** self.beta + self.gamma

    @property
    def beta_interval(self) -> tuple[float, float]:
        return _interval(self.samples[:, 1]) if len(self.samples) else (self.beta, self.beta)

    def predict(self, m: float) -> tuple[float, float, float]:
        """The predicted error at ``m`` rows and its 95% interval (over the bootstrap fits)."""
        m = _positive("m", m)
        value = float(self(m))
        if not len(self.samples):
            return value, value, value
        a, b, g = self.samples.T
        lo, hi = _interval(a * m ** b + g)
        return value, min(lo, value), max(hi, value)

    def size_for(self, error: float) -> tuple[float, float, float]:
        """Rows needed for ``error``, with a 95% interval. An error at or below the floor ``gamma`` is
        unreachable by more data: ``CurveFitError`` says so (an upper bound of the interval that is
        unreachable is ``inf``)."""
        error = _positive("error", error)
        if error <= self.gamma:
            raise CurveFitError(f"an error of {error:.4g} is unreachable: the fitted floor (irreducible error) is "
                                f"{self.gamma:.4g}; more data alone does not get below it")
        m = _inverse(self.alpha, self.beta, self.gamma, error)
        if not len(self.samples):
            return m, m, m
        sizes = np.array([_inverse(a, b, g, error) for a, b, g in self.samples])
        lo, hi = _interval(sizes)
        return m, min(lo, m), max(hi, m)

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma, "sizes": self.sizes,
                "small_data": self.small_data, "log_rms": self.log_rms, "samples": self.samples.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> PowerLaw:
        return cls(d["alpha"], d["beta"], d["gamma"], list(d["sizes"]), list(d["small_data"]), d["log_rms"],
                   np.asarray(d["samples"], dtype=float).reshape(-1, 3))


def fit_power_law(sizes, errors, bootstrap: int = 400, seed: int = 0) -> PowerLaw:
    """Fit error(m) = alpha * m**beta + gamma to ``errors[i]`` (the errors of the repeated runs at
    ``sizes[i]`` rows). Leading sizes that bend below the law (the small-data region) are left out while at
    least MIN_SIZES remain; ``bootstrap`` refits on the repeats resampled within each size give the intervals.
    Raises ``CurveFitError`` when the points do not support a fit."""
    m, runs = _check(sizes, errors)
    means = np.array([np.mean(r) for r in runs])
    if means[-1] >= means[0] or np.ptp(means) == 0 or np.corrcoef(np.log(m), means)[0, 1] > -0.5:
        raise CurveFitError(f"the error does not fall with more data (from {means[0]:.4g} at {m[0]:,.0f} rows to "
                            f"{means[-1]:.4g} at {m[-1]:,.0f}): no power law to fit; check the model learns, or "
                            "try larger sizes")
    start = 0
    params = _fit(m, means)
    # the small-data region: at the smallest sizes the error saturates (near a guess's), far below what the
    # law of the larger sizes says; drop the smallest point while it is the one furthest below the fit
    while len(m) - start > MIN_SIZES:
        resid = np.log(means[start:]) - np.log(_law(params, m[start:]))
        if not (resid[0] < -0.05 and resid[0] <= resid.min()):
            break
        start += 1
        params = _fit(m[start:], means[start:])
    used = slice(start, len(m))
    rms = float(np.sqrt(np.mean((np.log(means[used]) - np.log(_law(params, m[used]))) ** 2)))
    if rms > MAX_LOG_RMS:
        raise CurveFitError(f"the points do not follow a power law (RMS error of the fit {rms:.2f} in log space, "
                            f"more than {MAX_LOG_RMS}); more repeats or other sizes may help")
    alpha, beta, gamma = params
    if beta > -0.01:
        raise CurveFitError(f"the fitted exponent {beta:.3f} is flat: the error barely falls with more data")
    # Parametric bootstrap in log space: each size's mean drawn around the fitted law with the larger of (the
    # runs' spread pooled over sizes / sqrt(runs), the fit's own RMS): a few repeats per size estimate their
    # spread poorly one by one, and a misfit widens the intervals as it should.
    spread = _pooled_log_spread(runs[start:])
    sd = np.maximum([spread / math.sqrt(len(r)) for r in runs[start:]], rms)
    rng = np.random.default_rng(seed)
    centre = np.log(_law(params, m[used]))
    samples = [_fit(m[used], np.exp(centre + rng.normal(0, sd)), params) for _ in range(bootstrap)]
    return PowerLaw(float(alpha), float(beta), float(gamma), [int(x) for x in m[used]],
                    [int(x) for x in m[:start]], rms, np.array(samples).reshape(-1, 3))


def _pooled_log_spread(runs: list[np.ndarray]) -> float:
    """The standard deviation of one run's log error around its size's mean, pooled over the sizes."""
    dev = [np.log(r) - np.log(r).mean() for r in runs if len(r) > 1 and np.all(r > 0)]
    dof = sum(len(d) - 1 for d in dev)
    return float(np.sqrt(sum((d ** 2).sum() for d in dev) / dof)) if dof else 0.0


def _check(sizes, errors) -> tuple[np.ndarray, list[np.ndarray]]:
    m = np.asarray(list(sizes), dtype=float)
    runs = [np.asarray(list(e) if np.ndim(e) else [e], dtype=float) for e in errors]
    if len(m) != len(runs):
        raise CurveFitError(f"{len(m)} sizes but {len(runs)} lists of errors")
    if len(m) < MIN_SIZES:
        raise CurveFitError(f"{len(m)} sizes: a power law needs at least {MIN_SIZES} (three parameters and a check)")
    if np.any(m <= 0) or np.any(np.diff(m) <= 0):
        raise CurveFitError(f"sizes must be positive and increasing, got {m.tolist()}")
    for size, r in zip(m, runs):
        if not len(r) or not np.all(np.isfinite(r)) or np.any(r < 0):
            raise CurveFitError(f"the errors at {size:,.0f} rows must be finite and >= 0, got {r.tolist()}")
    if any(np.mean(r) <= 0 for r in runs):
        raise CurveFitError("an error of 0 at some size: the validation set is too easy or too small to measure a "
                            "curve on (its log is undefined)")
    return m, runs


def _law(params, m):
    alpha, beta, gamma = params
    return alpha * m ** beta + gamma


def _fit(m: np.ndarray, err: np.ndarray, start=None) -> tuple[float, float, float]:
    """Bounded least squares on log(error): alpha > 0, -2 <= beta <= 0, 0 <= gamma < min(error)."""
    floor = float(err.min()) * 0.999
    if start is None:
        slope, intercept = np.polyfit(np.log(m), np.log(err), 1)
        start = (math.exp(intercept), min(max(slope, -1.99), -1e-3), 0.0)
    x0 = [math.log(max(start[0], 1e-300)), min(max(start[1], -1.99), -1e-3), min(max(start[2], 0.0), floor * 0.5)]
    result = least_squares(lambda p: np.log(np.exp(p[0]) * m ** p[1] + p[2]) - np.log(err), x0,
                           bounds=([-700, -2.0, 0.0], [700, 0.0, max(floor, 1e-12)]), method="trf")
    return float(math.exp(result.x[0])), float(result.x[1]), float(result.x[2])


def _inverse(alpha: float, beta: float, gamma: float, error: float) -> float:
    if error <= gamma or beta >= 0:
        return math.inf
    return float(((error - gamma) / alpha) ** (1.0 / beta))


def _interval(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    tail = (1 - LEVEL) / 2 * 100
    finite = values[np.isfinite(values)]
    if len(finite) < len(values) * (1 - (1 - LEVEL) / 2):  # more than the upper tail unreachable
        return (float(np.percentile(finite, tail)) if len(finite) else math.inf), math.inf
    return float(np.nanpercentile(values, tail)), float(np.nanpercentile(values, 100 - tail))


def _positive(name: str, v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise CurveFitError(f"{name} must be a positive number, got {v!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise CurveFitError(f"{name} must be a positive number, got {v!r}")
    return v
