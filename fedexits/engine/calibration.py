"""Per-user threshold calibration (paper 3.1.4): sweep, Pareto front, tolerance, exit pruning.

Everything works from the softmax of every exit computed once (`exit_probabilities`): changing
the threshold or switching exits off only changes where each sample leaves, not what the exits
output, so a whole sweep is a few tensor ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from ..errors import check_settings

THRESHOLDS = [round(0.05 * i, 2) for i in range(21)]


@dataclass
class CalibrationConfig:
    """How each user's threshold is chosen (the command line's `calibration` section)."""

    drop_tolerance_pp: float = 1.0  # accuracy drop allowed against the final exit
    margin_z: float = 1.0  # standard errors added to the measured drop (0: none)
    prune_exits: bool = True  # switch off exits that cost more than they save

    def __post_init__(self):
        check_settings(
            "calibration",
            self,
            [
                ("drop_tolerance_pp", self.drop_tolerance_pp >= 0, ">= 0 percentage points"),
                ("margin_z", self.margin_z >= 0, ">= 0 standard errors"),
            ],
        )


# Named settings (the command line's `calibration=NAME`): changes to the defaults above.
CALIBRATION_PRESETS: dict[str, dict] = {"default": {}, "paper": dict(margin_z=0.0)}


@dataclass(frozen=True)
class ExitCosts:
    """Cost of reaching each exit's attach point (`backbone`, M+1 values: the last is the whole
    backbone) and of running each exit's head (`heads`, M+1 values: the last is the final
    classifier). Used for FLOPs and for latency alike."""

    backbone: Sequence[float]
    heads: Sequence[float]

    @classmethod
    def flops(cls, cost_table: pd.DataFrame) -> ExitCosts:
        return cls(cost_table["backbone_mflops"].tolist(), cost_table["head_mflops"].tolist())

    def per_exit(self, active: Sequence[bool]) -> torch.Tensor:
        """Cost of a sample leaving at each exit 0..M when only `active` early heads run."""
        costs, heads_run = [], 0.0
        for k, on in enumerate(active):
            heads_run += self.heads[k] if on else 0.0
            costs.append(self.backbone[k] + heads_run)
        costs.append(self.backbone[-1] + self.heads[-1] + heads_run)
        return torch.tensor(costs, dtype=torch.float64)

    @property
    def full(self) -> float:
        """The network without early exits."""
        return self.backbone[-1] + self.heads[-1]


def exits_taken(probs: torch.Tensor, thresholds: torch.Tensor, active: Sequence[bool]) -> torch.Tensor:
    """(T, N) exit index per threshold and sample: the first active exit whose top-1 softmax
    exceeds the threshold, else M (the final classifier)."""
    num_exits = probs.shape[0] - 1
    confidence = probs[:num_exits].max(dim=-1).values  # (M, N)
    passes = confidence[None] > thresholds[:, None, None]  # (T, M, N)
    passes &= torch.tensor(list(active), dtype=torch.bool)[None, :, None]
    passes = torch.cat([passes, torch.ones_like(passes[:, :1])], dim=1)  # the final always "passes"
    return passes.int().argmax(dim=1)  # first True


def sweep(
    probs: torch.Tensor,
    targets: torch.Tensor,
    flops: ExitCosts,
    active: Sequence[bool],
    latency: ExitCosts | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
) -> pd.DataFrame:
    """Accuracy, expected MFLOPs (and latency) and exit shares at every threshold."""
    t = torch.tensor(list(thresholds), dtype=probs.dtype)
    taken = exits_taken(probs, t, active)  # (T, N)
    predictions = probs.argmax(dim=-1)  # (M+1, N)
    correct = predictions.gather(0, taken) == targets[None]
    final_correct = (predictions[-1] == targets)[None]
    table = pd.DataFrame(
        {
            "threshold": list(thresholds),
            "accuracy": correct.double().mean(dim=1).numpy(),
            "expected_mflops": flops.per_exit(active)[taken].mean(dim=1).numpy(),
            # paired with the final exit: samples it gets right that an early exit loses, and back
            "losses": (final_correct & ~correct).sum(dim=1).numpy(),
            "gains": (~final_correct & correct).sum(dim=1).numpy(),
        }
    )
    if latency is not None:
        table["expected_latency_ms"] = latency.per_exit(active)[taken].mean(dim=1).numpy()
    for k in range(probs.shape[0]):
        table[f"share_exit_{k}"] = (taken == k).double().mean(dim=1).numpy()
    return table


def pareto_front(table: pd.DataFrame, cost: str = "expected_mflops") -> pd.DataFrame:
    """Rows not dominated by a cheaper-or-equal row with higher-or-equal accuracy."""
    ordered = table.sort_values([cost, "accuracy"], ascending=[True, False])
    keep, best = [], -1.0
    for index, accuracy in ordered["accuracy"].items():
        if accuracy > best:
            keep.append(index)
            best = accuracy
    return table.loc[keep]


@dataclass
class Calibration:
    threshold: float
    accuracy: float
    final_accuracy: float
    expected_mflops: float
    full_mflops: float
    active_exits: list[bool]
    sweep: pd.DataFrame = field(repr=False)
    pareto: pd.DataFrame = field(repr=False)
    expected_latency_ms: float | None = None
    full_latency_ms: float | None = None

    @property
    def speedup(self) -> float:
        return self.full_mflops / self.expected_mflops

    @property
    def latency_speedup(self) -> float | None:
        if self.expected_latency_ms is None:
            return None
        return self.full_latency_ms / self.expected_latency_ms

    def thresholds(self) -> list[float | None]:
        """Per-exit thresholds for `dynamic_inference` (None: exit pruned)."""
        return [self.threshold if on else None for on in self.active_exits]


def _choose(table: pd.DataFrame, n: int, tolerance_pp: float, margin_z: float) -> pd.Series:
    """The smallest threshold whose accuracy drop against the final exit is within the tolerance.
    The drop is measured paired, (losses - gains) / n; `margin_z` > 0 adds z standard errors,
    sqrt(losses + gains) / n, so a small calibration set does not pick a threshold on luck."""
    drop = (table["losses"] - table["gains"] + margin_z * (table["losses"] + table["gains"]) ** 0.5) / n
    ok = table[drop <= tolerance_pp / 100 + 1e-12]
    return ok.iloc[0]  # threshold 1.0 sends every sample to the final exit, so ok is never empty


def calibrate(
    probs: torch.Tensor,
    targets: torch.Tensor | None,
    cost_table: pd.DataFrame,
    latency: ExitCosts | None = None,
    tolerance_pp: float = 1.0,
    prune: bool = True,
    thresholds: Sequence[float] = THRESHOLDS,
    margin_z: float = 0.0,
) -> Calibration:
    """Choose a user's threshold on its calibration set.

    `targets` are labels, or None to measure agreement with the final exit (users without
    labels). `margin_z` makes the choice conservative on small calibration sets (see `_choose`).
    With `prune`, exits are switched off greedily while that lowers the expected cost at the
    chosen threshold (an exit that never lets samples leave only adds its head's cost).
    """
    if tolerance_pp < 0:
        raise ValueError(f"drop tolerance must be >= 0 percentage points, got {tolerance_pp}")
    if margin_z < 0:
        raise ValueError(f"calibration margin must be >= 0 standard errors, got {margin_z}")
    for t in thresholds:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"thresholds must be in [0, 1], got {t}")
    if targets is None:
        targets = probs[-1].argmax(dim=-1)
    flops = ExitCosts.flops(cost_table)
    final_accuracy = float((probs[-1].argmax(-1) == targets).double().mean())

    def evaluate(active):
        table = sweep(probs, targets, flops, active, latency, thresholds)
        return table, _choose(table, len(targets), tolerance_pp, margin_z)

    active = [True] * (probs.shape[0] - 1)
    table, chosen = evaluate(active)
    while prune and any(active):
        trials = []
        for k in (k for k, on in enumerate(active) if on):
            trial = active.copy()
            trial[k] = False
            trials.append((trial, *evaluate(trial)))
        trial, trial_table, trial_chosen = min(trials, key=lambda r: r[2]["expected_mflops"])
        if trial_chosen["expected_mflops"] >= chosen["expected_mflops"] - 1e-9:
            break
        active, table, chosen = trial, trial_table, trial_chosen
    if prune and chosen["expected_mflops"] > flops.full:  # exits cost more than they save
        active = [False] * len(active)
        table, chosen = evaluate(active)
    return Calibration(
        threshold=float(chosen["threshold"]),
        accuracy=float(chosen["accuracy"]),
        final_accuracy=final_accuracy,
        expected_mflops=float(chosen["expected_mflops"]),
        full_mflops=flops.full,
        active_exits=active,
        sweep=table,
        pareto=pareto_front(table),
        expected_latency_ms=None if latency is None else float(chosen["expected_latency_ms"]),
        full_latency_ms=None if latency is None else latency.full,
    )


def apply_calibration(
    probs: torch.Tensor,
    targets: torch.Tensor,
    calibration: Calibration,
    cost_table: pd.DataFrame,
    latency: ExitCosts | None = None,
) -> pd.Series:
    """The chosen threshold and exits evaluated on another set (e.g. the user's test split)."""
    table = sweep(
        probs,
        targets,
        ExitCosts.flops(cost_table),
        calibration.active_exits,
        latency,
        [calibration.threshold],
    )
    return table.iloc[0]
