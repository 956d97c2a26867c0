"""Two-sample tests of the Orchestrator's feature-shift rule: does the mean of a window of inputs'
pooled first-exit features differ from the calibration samples'? Each gives a z, about 0 without
a shift, that the rule's CUSUM adds up.

- `diagonal`: the mean over features of the squared standardised difference of means, T,
  centred and scaled by the features' effective number (dof): z = (T - 1) / sqrt(2 / dof). It
  ignores the features' correlations, so a shift against them counts no more than one along them,
  and its spread estimates are the calibration samples' alone: with few of them, z has heavy tails.
- `hotelling`: the two-sample Hotelling T^2 with the pooled within-sample covariance (window and
  calibration samples, each about its own mean), whose scaled form is exactly F(q, n + m - q - 1)
  for normal features (q features, n window inputs, m calibration samples). z is the F's normal
  approximation (Paulson 1942), so it is about N(0, 1) without a shift, also at small m (measured
  at m = 10 to 120: simulations/shift_test_power.py), and a shift against the features'
  correlations counts fully.
"""

from __future__ import annotations

import math

import numpy as np

SHIFT_TESTS = ("diagonal", "hotelling")
FEATURE_SD_FLOOR = 1e-3  # per feature, relative to the mean spread: a constant feature adds nothing
RANK_TOLERANCE = 1e-9  # correlation eigenvalues below this share of the largest carry no direction


def floor_spread(sd: np.ndarray) -> np.ndarray:
    """(C,) spreads floored at FEATURE_SD_FLOOR of their mean (no division by ~0)."""
    return np.maximum(sd, FEATURE_SD_FLOOR * max(sd.mean(), 1e-12))


def effective_features(features: np.ndarray, sd: np.ndarray) -> float:
    """C^2 / sum of squared correlations: C for independent features, 1 for identical ones."""
    correlation = np.nan_to_num(np.corrcoef((features / sd).T), nan=0.0)
    np.fill_diagonal(correlation, 1.0)
    return float(len(sd) ** 2 / (correlation**2).sum())


def reference_summary(
    features: np.ndarray, covariance: bool
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """(mean, floored spread, effective number of features, covariance or (0, 0) without
    `covariance`): what both tests need of the calibration samples' features (m >= 2, C)."""
    sd = floor_spread(features.std(0, ddof=1))
    cov = np.cov(features.T, ddof=1).reshape(len(sd), -1) if covariance else np.zeros((0, 0))
    return features.mean(0), sd, effective_features(features, sd), cov


def diagonal_z(window: np.ndarray, mean: np.ndarray, sd: np.ndarray, dof: float, m: int) -> float:
    """z of the diagonal test: `window` (n, C) against a reference of m samples (mean, sd, dof)."""
    n = len(window)
    difference = (window.mean(0) - mean) / sd
    t = float((difference**2 / (1 / n + 1 / m)).mean())
    return (t - 1) / math.sqrt(2 / dof)


def hotelling_z(window: np.ndarray, mean: np.ndarray, covariance: np.ndarray, m: int) -> float:
    """z of the two-sample Hotelling test: `window` (n, C) against a reference of m samples (mean,
    covariance with ddof 1). Directions the pooled covariance does not span are left out (q <= C);
    nan when no direction varies (q = 0) or n + m - q - 1 < 1 (too few samples). With nearly as many features
    as samples, the normal approximation is poor and z too low (a missed shift, not an alarm)."""
    n = len(window)
    window_covariance = np.cov(window.T, ddof=1).reshape(covariance.shape)
    pooled = ((n - 1) * window_covariance + (m - 1) * covariance) / (n + m - 2)
    sd = floor_spread(np.sqrt(np.clip(np.diag(pooled), 0, None)))
    values, vectors = np.linalg.eigh(pooled / np.outer(sd, sd))
    kept = values > RANK_TOLERANCE * values.max()
    projected = vectors[:, kept].T @ ((window.mean(0) - mean) / sd)
    t2 = float((projected**2 / values[kept]).sum()) / (1 / n + 1 / m)
    q = int(kept.sum())
    d2 = n + m - q - 1
    if q == 0 or d2 < 1:
        return math.nan
    f = t2 * d2 / (q * (n + m - 2))
    a, b = 2 / (9 * q), 2 / (9 * d2)
    return ((1 - b) * f ** (1 / 3) - (1 - a)) / math.sqrt(a + b * f ** (2 / 3))
