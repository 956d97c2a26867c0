"""Exact tests behind the calibration rule `ltt` and the paired guard.

Calibration. A policy (threshold t, active exits) is compared with the final exit on the same
calibration samples. Per sample the paired difference D = [final right] - [policy right] is +1 (a
*loss*: the final exit is right, the early exit that took the sample is wrong), -1 (a *gain*) or
0; the accuracy drop is R = E[D] = p_loss - p_gain. "The drop is within the tolerance m" is the
hypothesis to *establish*, so each threshold's null hypothesis is H_t: R(t) >= m, tested from the
counts (losses, gains) of n i.i.d. samples, a trinomial with a nuisance parameter.

- The loss is kept three-valued on purpose. Counting losses only (D in {0, 1}, exact binomial)
  bounds p_loss, not the drop, and no test can certify p_loss <= 1% from fewer than ~230 samples
  at 90% (even zero losses in 150 samples allow p_loss = 1.5%). Gains are what make a 1 pp
  promise possible on 20-150 samples; rescaling D to [0, 1] for Hoeffding-Bentkus (as in RCPS /
  LTT's examples) throws that away: its variance bound is for a coin, not for a mostly-zero D.
- The test is *exact and unconditional* (Barnard-type: the p-value is the largest tail
  probability over the nuisance parameter, here p_gain on the boundary p_loss = p_gain + m). The
  outcomes are ordered by a betting e-value (Waudby-Smith & Ramdas, "Estimating means of bounded
  random variables by betting", JRSS-B 2023): a mixture over bet sizes of prod(1 + lam (m - D_i)),
  which grows with every gain and shrinks with every loss. Because that order is monotone (a
  loss turned into a tie, or a tie into a gain, never lowers it), the largest tail probability
  under H_t lies on the boundary R = m, so maximising over p_gain there gives a valid p-value for
  the whole composite null. With m = 1 pp and 90% confidence, 30 samples need 2 gains and no
  loss (or 4 gains and 1 loss) to certify a threshold; 140 samples need 1 gain and no loss.
  The maximum is taken over a grid of p_gain values (dense near 0, where it lies for small
  counts); the grid error is far below the Monte-Carlo error of any use here (tests check the
  level by simulation).
- Learn-then-Test (Angelopoulos, Bates, Candes, Jordan & Lei, "Learn then Test: Calibrating
  predictive algorithms to achieve risk control", 2021): thresholds are tested in a fixed order,
  highest first, each at the full level delta, stopping at the first one not rejected (fixed-
  sequence testing controls the family-wise error at delta, whatever the shape of R(t)). Any
  rejected threshold then has R <= m with probability >= 1 - delta, jointly, so the cheapest may
  be picked.

Guard. Personalised vs shared exit on the same samples: an exact one-sided McNemar test for
accuracy, a paired sign-flip (randomisation) test for per-sample cross-entropy.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

NUISANCE_POINTS = 512  # p_gain values over which the tail probability is maximised
BET_FRACTIONS = torch.arange(1, 21, dtype=torch.float64) / 21  # lam * (1 - m): bet sizes < 1


def _outcomes(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (losses, gains) with losses + gains <= n."""
    losses, gains = torch.meshgrid(torch.arange(n + 1), torch.arange(n + 1), indexing="ij")
    keep = losses + gains <= n
    return losses[keep].double(), gains[keep].double()


def log_betting_evidence(losses, gains, n: int, tolerance: float) -> torch.Tensor:
    """log of the mixture e-value for H: drop >= tolerance; large = evidence that the drop is
    below the tolerance. Used to order outcomes (the p-value itself is exact, not Markov's)."""
    losses, gains = torch.as_tensor(losses, dtype=torch.float64), torch.as_tensor(gains, dtype=torch.float64)
    lam = BET_FRACTIONS / (1 - tolerance)
    ties = n - losses - gains
    log_capital = (
        gains[..., None] * torch.log1p(lam * (tolerance + 1))
        + ties[..., None] * torch.log1p(lam * tolerance)
        + losses[..., None] * torch.log1p(lam * (tolerance - 1))
    )
    return torch.logsumexp(log_capital, dim=-1) - np.log(len(lam))


@functools.lru_cache(maxsize=32)
def drop_p_value_table(n: int, tolerance: float) -> torch.Tensor:
    """(n+1, n+1) exact p-values for H: drop >= tolerance, indexed [losses, gains] (1 where
    losses + gains > n). Cached: users with the same number of calibration samples share it."""
    if n < 1:
        raise ValueError(f"need at least one calibration sample, got {n}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"drop tolerance must be in [0, 1) as a fraction, got {tolerance}")
    losses, gains = _outcomes(n)
    ties = n - losses - gains
    evidence = log_betting_evidence(losses, gains, n, tolerance)
    order = torch.argsort(evidence, descending=True, stable=True)
    statistic = evidence[order]
    # tail end of each outcome's tie group: P(statistic >= observed) includes ties
    tie_end = torch.searchsorted(-statistic, -statistic, right=True) - 1
    log_coefficient = (
        torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64))
        - torch.lgamma(losses + 1)
        - torch.lgamma(gains + 1)
        - torch.lgamma(ties + 1)
    )[order]
    losses, gains, ties = losses[order], gains[order], ties[order]
    u = torch.arange(NUISANCE_POINTS, dtype=torch.float64) / NUISANCE_POINTS
    p_gain_grid = (1 - tolerance) / 2 * u**2  # dense near 0; R = m on the boundary
    worst = torch.zeros(len(losses), dtype=torch.float64)
    chunk = max(1, 2_000_000 // len(losses))
    for start in range(0, NUISANCE_POINTS, chunk):
        p_gain = p_gain_grid[start : start + chunk, None]
        p_loss = p_gain + tolerance
        p_tie = 1 - p_loss - p_gain
        log_pmf = (
            log_coefficient
            + torch.xlogy(losses, p_loss)
            + torch.xlogy(gains, p_gain)
            + torch.xlogy(ties, p_tie)
        )
        tails = torch.cumsum(log_pmf.exp(), dim=1)[:, tie_end]
        worst = torch.maximum(worst, tails.max(dim=0).values)
    table = torch.ones(n + 1, n + 1, dtype=torch.float64)
    table[losses.long(), gains.long()] = worst.clamp(max=1.0)
    return table


def drop_p_values(losses: Sequence[int], gains: Sequence[int], n: int, tolerance: float) -> np.ndarray:
    """Exact p-values for H: drop >= tolerance (a fraction) at each (losses, gains) count of n
    paired calibration samples; small = the drop is credibly below the tolerance."""
    table = drop_p_value_table(int(n), float(tolerance))
    return table[torch.tensor(np.array(losses)), torch.tensor(np.array(gains))].numpy()


def fixed_sequence(p_values: Sequence[float], delta: float) -> np.ndarray:
    """Fixed-sequence testing: reject hypotheses in the given order while p <= delta, stop at
    the first that is not rejected. Controls the family-wise error rate at delta."""
    passed = np.asarray(p_values, dtype=float) <= delta
    return np.cumprod(passed).astype(bool)


def mcnemar_p_value(wins: int, defeats: int) -> float:
    """One-sided exact McNemar test of "the new model is no more accurate than the old": wins are
    samples only the new model gets right, defeats samples only the old one gets right;
    P(Binomial(wins + defeats, 1/2) >= wins)."""
    total = wins + defeats
    if total == 0:
        return 1.0
    k = torch.arange(wins, total + 1, dtype=torch.float64)
    log_pmf = (
        torch.lgamma(torch.tensor(total + 1.0, dtype=torch.float64))
        - torch.lgamma(k + 1)
        - torch.lgamma(total - k + 1)
        - total * np.log(2.0)
    )
    return float(log_pmf.exp().sum().clamp(max=1.0))


def sign_flip_p_value(improvement: torch.Tensor, draws: int = 2000, seed: int = 0) -> float:
    """One-sided paired randomisation test of "no improvement": under the null the sign of each
    sample's improvement (e.g. old minus new cross-entropy) is a fair coin. Monte-Carlo over
    `draws` seeded sign flips; the +1's make the p-value valid for a finite number of draws."""
    improvement = torch.as_tensor(improvement, dtype=torch.float64).flatten()
    if len(improvement) == 0:
        return 1.0
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (draws, len(improvement)), generator=generator, dtype=torch.float64) * 2 - 1
    flipped = (signs * improvement).sum(dim=1)
    observed = improvement.sum()
    return float((1 + (flipped >= observed - 1e-12).sum()) / (draws + 1))
