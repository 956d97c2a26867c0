"""The paper's Orchestrator (PersEPhonEE section 3.4): its rules and their settings.

Three phases:
- *Inference*: every input is served by the selected (active) exits at the active threshold.
- *Exploration*: with probability `p_expl` an input also runs to the final exit (which then
  answers it). The paper flags a drift when the exits' loss against the final exit on explored
  inputs *stays* higher than at calibration time. What the rule tracks is `statistic`. By
  default, `feature_shift`: a label-free test of the paper's premise, "the input distribution
  has shifted", on every input, needing no exploration. The first exit's features (computed for
  every input anyway), averaged over space (or over each cell of a `shift_grid` x `shift_grid`
  partition of the feature map: where on the image the strokes are, which the mean hides), of the
  last `shift_window` inputs are compared with the calibration samples' by a two-sample test
  (`shift_test`, engine.shift_tests: `diagonal` or `hotelling`). Each window's z feeds a CUSUM,
  S <- max(0, S + z - `shift_slack`), drift when S > `shift_alarm`: a shift that stays moderate
  adds up over a few windows (slack 8, alarm 0 is the single-window test z > 8). On the tuning
  users the writer drift did not raise the exits' loss (the shared exits hold up on the new writer).
  The loss rules: the paper's cross-entropy of each selected early exit against the final exit's
  top-1 (capped at ln(classes)) averaged over the selected exits (`statistic="cross_entropy"`),
  or whether the served answer differs from the final exit's (`"disagreement"`), on explored
  inputs, with a one-sided CUSUM standardised by the loss's calibration mean and deviation:
  S <- max(0, S + z - `cusum_slack`), drift when S > `cusum_alarm`. Only a persistent rise
  accumulates; the state is one number, and the day S last left zero estimates when the drift
  began. (The paper tracks every exit; one statistic over the selected exits avoids testing up to
  M of them, and a drift moves them together.) On a drift: the flag is raised, the threshold goes
  to `raised_threshold` (thr': more inputs reach the fail-safe) and personalisation is scheduled
  on the samples that arrived since the drift began. The rule is checked every `check_every`
  inputs, so a drift can be caught on the day it starts. It needs a calibration on at least
  `min_reference` samples.
- *Personalisation*, overnight, when the on-device buffer holds at least one personalisation batch
  and either enough new samples arrived since the last personalisation (section 4.3: below that,
  the exits gain little; `accuracy_vs_samples` measures it): `min_new_samples` of them, or
  `min_new_share` of the samples the exits last trained on, since accuracy grows with the log of
  the samples and early nights gain the most; or the active threshold is at least
  `threshold_deviation` above the calibrated one (a flagged drift). Such a night trains `epochs`
  epochs at `lr` (more epochs and a larger step than nightly's: it comes far less often). Then
  the exits are recalibrated (`engine.calibrate`) and re-profiled, the statistic restarts from
  the new reference, and the threshold returns to the calibrated one. A flagged drift with less
  than a batch since it began is a *reset* night: the shared threshold, with the exits
  `reset_exits` says (`better`: the user's if they beat the shared ones on the samples since the
  drift, as after a false alarm).

The state these rules act on is `engine.user_state.UserState`: plain numbers and arrays, so it
can live in Flower's Context.state between rounds (one round = one day).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SettingsError
from .calibration import exits_taken
from .shift_tests import SHIFT_TESTS

STATISTICS = ("feature_shift", "disagreement", "cross_entropy")
RESET_EXITS = ("shared", "kept", "better")  # `better`: which scores higher on the samples since the drift


@dataclass
class OrchestratorConfig:
    """Parameters of the Orchestrator; the module docstring says what each rule does."""

    # 0 with feature_shift, which needs no exploration: on the tuning users (synthetic 0-19, LEAF
    # tuning writers) exploring 5% of inputs bought no detection and cost drifted users 2-3 pp of
    # the full network's FLOPs (60.0% against 57.5%, the target being 60%). A loss rule needs > 0.
    p_expl: float = 0.0  # probability that an input also runs to the final exit
    statistic: str = "feature_shift"  # what the drift rule tracks (STATISTICS)
    shift_window: int = 20  # feature_shift: inputs compared with the calibration samples (one day)
    # 1 (the spatial mean): grid 3 (alarm 12) tied on the tuning users over drift seeds 0-2 with fewer
    # false alarms, but cells blank on a small calibration set make z explode (465 for a steady user)
    shift_grid: int = 1  # feature_shift: features averaged over each cell of a grid x grid partition
    # hotelling, slack 1.5, alarm 4: on the tuning users over drift seeds 0-2, the same 4 targets
    # missed in 6 draws as diagonal (slack 2, alarm 8), with 71 of 80 drifted users flagged
    # against 64 and 3 false alarms in 135 user-runs without drift against 6; its z keeps its law
    # on a small calibration set, where the diagonal test's tails widen
    shift_test: str = "hotelling"  # feature_shift: the two-sample test of each window (SHIFT_TESTS)
    shift_slack: float = 1.5  # feature_shift: CUSUM slack k on each window's z
    shift_alarm: float = 4.0  # feature_shift: CUSUM alarm level h
    cusum_slack: float = 0.5  # CUSUM slack k, in calibration standard deviations per input
    cusum_alarm: float = 4.0  # CUSUM alarm level h, in calibration standard deviations
    min_reference: int = 10  # calibration samples needed before the drift rule may fire
    # 0.9 (with threshold_deviation 0.1): on the tuning users over drift seeds 0-2, the same
    # accuracy as 1.0 (every input to the final exit) on every draw at 0.3-2.0 pp fewer drifted
    # FLOPs; 0.85 cost synthetic users within 2 pp under scenario=both (84.6% against 92.3%)
    raised_threshold: float = 0.9  # thr' while a drift is flagged
    check_every: int = 5  # inputs between two checks of the drift rule within a day
    # 30: on the tuning users, 60 left users without drift 5.6 pp below nightly, 30 4.2 pp at 24%
    # of nightly's training compute, 15 2.2 pp at 38% (over the 35% allowed)
    min_new_samples: int = 30  # personalise once this many new samples are buffered ...
    # ... or once the new samples are this share of those the exits last trained on (None: off):
    # accuracy grows with the log of the samples (Fig. 4), so early nights gain the most. 0.5
    # with epochs=15: users without drift 0.7 pp below nightly at 28% of its compute (synthetic
    # tuning users; LEAF tuning writers +0.1 pp at 19%), against 4.1 pp at 24% without it
    min_new_share: float | None = 0.5
    # ... or once the active threshold is this far above the calibrated one (a flagged drift: thr'
    # is raised_threshold, at least this much above lifecycle.shared_threshold)
    threshold_deviation: float = 0.1
    # personalisation epochs of the orchestrators' nights (None: personalisation.epochs, what
    # nightly uses): they personalise far less often than nightly, so each night can train longer
    epochs: int | None = 15
    # 0.002: on the tuning users over drift seeds 0-2, no target missed in 6 draws (0.001 and 10
    # epochs at 0.002 or 0.003: 2 each), steady users -0.2 to +1.8 pp against nightly, same compute
    lr: float | None = 0.002  # learning rate of the orchestrators' nights (None: personalisation.lr)
    restart_on_drift: bool = True  # a drift night (personalisation or reset) starts from the shared exits
    reset_exits: str = "shared"  # what a reset night serves (RESET_EXITS; `shared` honours restart_on_drift)

    def __post_init__(self):
        checks = [
            ("p_expl", 0 <= self.p_expl <= 1, "in [0, 1]"),
            ("statistic", self.statistic in STATISTICS, f"one of {', '.join(STATISTICS)}"),
            ("shift_window", self.shift_window >= 2, "an integer >= 2"),
            ("shift_grid", self.shift_grid >= 1, "an integer >= 1"),
            ("shift_test", self.shift_test in SHIFT_TESTS, f"one of {', '.join(SHIFT_TESTS)}"),
            ("reset_exits", self.reset_exits in RESET_EXITS, f"one of {', '.join(RESET_EXITS)}"),
            ("shift_slack", self.shift_slack >= 0, ">= 0"),
            ("shift_alarm", self.shift_alarm >= 0, ">= 0"),
            ("cusum_slack", self.cusum_slack >= 0, ">= 0"),
            ("cusum_alarm", self.cusum_alarm > 0, "> 0"),
            ("min_reference", self.min_reference >= 2, "an integer >= 2"),
            ("raised_threshold", 0 <= self.raised_threshold <= 1, "in [0, 1]"),
            ("check_every", self.check_every >= 1, "an integer >= 1"),
            ("min_new_samples", self.min_new_samples >= 1, "an integer >= 1"),
            ("min_new_share", self.min_new_share is None or self.min_new_share > 0, "> 0 or null"),
            ("epochs", self.epochs is None or self.epochs >= 1, "an integer >= 1 or null"),
            ("lr", self.lr is None or self.lr > 0, "> 0 or null"),
            ("threshold_deviation", 0 <= self.threshold_deviation <= 1, "in [0, 1]"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise SettingsError(
                    f"lifecycle.orchestrator.{name} must be {expected}, got {getattr(self, name)!r}"
                )
        if self.statistic != "feature_shift" and self.p_expl == 0:
            raise SettingsError(
                f"lifecycle.orchestrator.p_expl must be > 0 with statistic={self.statistic} "
                "(its loss is measured on explored inputs), got 0"
            )

    def deviated(self, threshold: float, calibrated: float) -> bool:
        """The threshold-deviation rule: `threshold` is at least `threshold_deviation` above the
        calibrated one (float tolerance: 0.9 - 0.8 is 0.0999...)."""
        return threshold - calibrated >= self.threshold_deviation - 1e-12


def exploration_losses(probs: torch.Tensor, active: list[bool]) -> np.ndarray:
    """(n,) the exploration loss of every input, from the softmax of every exit (M+1, n, classes):
    the cross-entropy of each selected early exit against the final exit's top-1, capped at
    ln(classes), averaged over the selected exits (nan if none is selected). No labels needed."""
    on = torch.tensor(list(active), dtype=torch.bool)
    if not on.any():
        return np.full(probs.shape[1], math.nan)
    final_top1 = probs[-1].argmax(-1)
    exits = probs[:-1][on]
    picked = exits.gather(2, final_top1[None, :, None].expand(len(exits), -1, 1))[..., 0]
    cap = math.log(probs.shape[-1])
    return (-picked.clamp_min(1e-12).log()).clamp_max(cap).mean(0).double().numpy()


def served_disagreement(probs: torch.Tensor, threshold: float, active: list[bool]) -> np.ndarray:
    """(n,) 1.0 where the answer served at `threshold` (the first active exit whose top-1 softmax
    passes it) differs from the final exit's top-1, 0.0 where they agree or the final exit
    serves: the harm the fail-safe promise is about, measured without labels."""
    taken = exits_taken(probs, torch.tensor([threshold], dtype=probs.dtype), active)[0]
    predictions = probs.argmax(-1)
    return (predictions.gather(0, taken[None])[0] != predictions[-1]).double().numpy()


def exploration_statistic(probs: torch.Tensor, threshold: float, active: list[bool], statistic: str):
    """(n,) the loss a loss rule tracks per input. "disagreement" (`served_disagreement`): does
    the served answer differ from the final exit's, what the fail-safe promise is about.
    "cross_entropy" (`exploration_losses`): the paper's loss of every selected exit against the
    final exit."""
    if statistic == "disagreement":
        return served_disagreement(probs, threshold, active)
    return exploration_losses(probs, active)
