"""The paper's Orchestrator (PersEPhonEE section 3.4): one user's lifelong state and its rules.

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

The state is plain numbers and arrays (`UserState.to_arrays` / `UserState.from_arrays`), so it can
live in Flower's Context.state between rounds (one round = one day).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ..errors import SettingsError
from .calibration import exits_taken
from .shift_tests import SHIFT_TESTS, diagonal_z, hotelling_z, reference_summary

STATISTICS = ("feature_shift", "disagreement", "cross_entropy")
RESET_EXITS = ("shared", "kept", "better")  # `better`: which scores higher on the samples since the drift
SD_FLOOR = 0.25  # a calibration spread of the statistic below this is treated as this (no division by ~0)


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


def _empty_images(image_shape) -> np.ndarray:
    return np.zeros((0, *image_shape), np.uint8)


@dataclass
class UserState:
    """Everything a device keeps about itself between days. Arrays are numpy; `exits` is None
    while the user runs the shared exits. `active_exits` all False and threshold 1.0 until the
    first calibration: every input goes to the fail-safe."""

    num_exits: int
    image_shape: tuple[int, ...]
    day: int = 0  # the next day to live
    exits: dict[str, torch.Tensor] | None = None  # the heads that differ from the shared ones
    calibrated: bool = False
    threshold: float = 1.0  # active threshold (thr' while a drift is flagged)
    calibrated_threshold: float = 1.0
    active_exits: list[bool] = field(default_factory=list)
    reference_mean: float = math.nan  # exploration loss on the calibration samples: mean ...
    reference_sd: float = math.nan  # ... standard deviation ...
    reference_n: int = 0  # ... and how many samples
    feature_mean: np.ndarray = None  # float64 (C,): the first exit's pooled features on the ...
    feature_sd: np.ndarray = None  # ... calibration samples: their mean and spread per channel ...
    feature_dof: float = math.nan  # ... the channels' effective number ...
    feature_cov: np.ndarray = None  # ... and their covariance (C, C) for the hotelling test, else (0, 0)
    window_features: np.ndarray = None  # float32 (<= shift_window, C): the latest inputs' ...
    window_days: np.ndarray = None  # ... and their days
    cusum: float = 0.0  # the drift statistic: CUSUM S (of the losses, or of the windows' z)
    cusum_start_day: int = 0  # the day the drift began, by the statistic's estimate
    explored: int = 0  # inputs explored since the last calibration
    drift_flagged: bool = False
    flagged_day: int = -1
    train_from_day: int = 0  # personalisation uses buffered samples that arrived from this day on
    new_samples: int = 0  # buffered since the last personalisation
    trained_samples: int = 0  # samples the last personalisation used
    personalisations: int = 0
    last_personalised_day: int = -1
    calibration_accuracy: float = math.nan  # profile at the last calibration (its split)
    calibration_mflops: float = math.nan
    buffer_images: np.ndarray = None  # uint8 (B, C, H, W), oldest first
    buffer_labels: np.ndarray = None  # int64 (B,), -1 where the device has no label
    buffer_labelled: np.ndarray = None  # bool (B,)
    buffer_day: np.ndarray = None  # int64 (B,): arrival day

    def __post_init__(self):
        self.image_shape = tuple(int(s) for s in self.image_shape)
        if not self.active_exits:
            self.active_exits = [False] * self.num_exits
        defaults = {
            "buffer_images": _empty_images(self.image_shape),
            "buffer_labels": np.zeros(0, np.int64),
            "buffer_labelled": np.zeros(0, bool),
            "buffer_day": np.zeros(0, np.int64),
            "feature_mean": np.zeros(0),
            "feature_sd": np.zeros(0),
            "feature_cov": np.zeros((0, 0)),
            "window_features": np.zeros((0, 0), np.float32),
            "window_days": np.zeros(0, np.int64),
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    # -- buffer ------------------------------------------------------------------------------
    @property
    def buffered(self) -> int:
        return len(self.buffer_labels)

    def admit(self, images: np.ndarray, labels: np.ndarray, labelled: np.ndarray, day: int, capacity: int):
        """Append the day's trainable inputs (labels only where the device knows them) and keep
        the `capacity` most recent."""
        known = np.where(labelled, labels, -1)
        self.buffer_images = np.concatenate([self.buffer_images, images])[-capacity:]
        self.buffer_labels = np.concatenate([self.buffer_labels, known])[-capacity:]
        self.buffer_labelled = np.concatenate([self.buffer_labelled, labelled])[-capacity:]
        self.buffer_day = np.concatenate([self.buffer_day, np.full(len(labels), day)])[-capacity:]
        self.new_samples += len(labels)

    def clear_buffer(self) -> None:
        self.buffer_images = _empty_images(self.image_shape)
        self.buffer_labels = np.zeros(0, np.int64)
        self.buffer_labelled = np.zeros(0, bool)
        self.buffer_day = np.zeros(0, np.int64)

    def training_rows(self) -> np.ndarray:
        """Buffer rows personalisation may use: those since `train_from_day` (a flagged drift
        moves it to the day the drift began, by the CUSUM's estimate)."""
        return np.flatnonzero(self.buffer_day >= self.train_from_day)

    def personalised(self, exits: dict[str, torch.Tensor], trained_samples: int) -> None:
        """Tonight's personalisation produced `exits` from `trained_samples` buffered samples."""
        self.exits = exits
        self.personalisations += 1
        self.last_personalised_day = self.day
        self.new_samples = 0
        self.trained_samples = trained_samples

    def enough_new_samples(self, config: OrchestratorConfig) -> bool:
        """The data rule: `min_new_samples` new samples, or `min_new_share` of the last training set."""
        share = config.min_new_share
        return self.new_samples >= config.min_new_samples or (
            share is not None and self.new_samples >= share * self.trained_samples
        )

    # -- exploration statistic ---------------------------------------------------------------
    def explore(self, losses: np.ndarray, slack: float) -> None:
        """Feed losses (n,) of monitored inputs, in arrival order, to the CUSUM."""
        sd = max(self.reference_sd, SD_FLOOR)
        for loss in losses.tolist():
            self._cusum_step((loss - self.reference_mean) / sd - slack, self.day)
            self.explored += 1

    def _cusum_step(self, rise: float, start_day: int) -> None:
        """S <- max(0, S + rise), shared by both statistics; S leaving zero dates the drift."""
        if self.cusum == 0.0 and rise > 0:
            self.cusum_start_day = start_day
        self.cusum = max(0.0, self.cusum + rise)

    def drift_rule(self, config: OrchestratorConfig) -> bool:
        """True once the statistic (the exploration loss, or the windows' feature-shift z) has
        stayed above its calibration reference long enough for the CUSUM to pass the alarm
        level (`cusum_alarm`, or `shift_alarm`)."""
        monitored = self.calibrated and any(self.active_exits) and self.reference_n >= config.min_reference
        alarm = config.shift_alarm if config.statistic == "feature_shift" else config.cusum_alarm
        return monitored and self.cusum > alarm

    def flag_drift(self, config: OrchestratorConfig) -> None:
        self.drift_flagged = True
        self.flagged_day = self.day
        self.threshold = max(self.threshold, config.raised_threshold)
        self.train_from_day = max(self.train_from_day, self.cusum_start_day)

    def set_feature_reference(self, pooled: np.ndarray, test: str = OrchestratorConfig.shift_test) -> None:
        """The reference of `feature_shift` from the calibration samples' pooled first-exit
        features (n, C): mean, spread, effective number of channels and, for the `hotelling`
        test (engine.shift_tests), the covariance; the window restarts."""
        self.reference_n = len(pooled)
        self.window_features = np.zeros((0, pooled.shape[1]), np.float32)
        self.window_days = np.zeros(0, np.int64)
        self.feature_cov = np.zeros((0, 0))
        if len(pooled) < 2:
            self.feature_mean, self.feature_sd, self.feature_dof = np.zeros(0), np.zeros(0), math.nan
            return
        summary = reference_summary(pooled, covariance=test == "hotelling")
        self.feature_mean, self.feature_sd, self.feature_dof, self.feature_cov = summary

    def observe_features(self, pooled: np.ndarray, window: int, slack: float) -> float:
        """Append inputs' pooled features (n, C), keep the latest `window`, and when the window is
        full, test it against the reference (the test the reference was set for) and feed its z
        to the CUSUM: S <- max(0, S + z - slack); when S leaves zero, `cusum_start_day` <- the
        day of the window's oldest input. Returns z (nan while the window is not full, or too
        small for the features). Nothing is kept before the first reference."""
        if not len(self.feature_sd):
            return math.nan
        self.window_features = np.concatenate([self.window_features, pooled.astype(np.float32)])[-window:]
        self.window_days = np.concatenate([self.window_days, np.full(len(pooled), self.day)])[-window:]
        if len(self.window_features) < window:
            return math.nan
        window_features, m = self.window_features, self.reference_n
        if self.feature_cov.size:
            z = hotelling_z(window_features.astype(np.float64), self.feature_mean, self.feature_cov, m)
        else:
            z = diagonal_z(window_features, self.feature_mean, self.feature_sd, self.feature_dof, m)
        if not math.isnan(z):
            self._cusum_step(z - slack, int(self.window_days[0]))
        return z

    def recalibrated(self, threshold: float, active: list[bool], losses: np.ndarray) -> None:
        """A new calibration: threshold and exits from `engine.calibrate`, the reference of the
        exploration loss from `losses` (n,) of the calibration samples; the CUSUM restarts. The
        feature reference is dropped: it described the old calibration's inputs (`feature_shift`
        sets a new one; a reset with no sample since the drift leaves the rule waiting)."""
        self.set_feature_reference(np.zeros((0, 0)))
        self.calibrated = True
        self.threshold = self.calibrated_threshold = float(threshold)
        self.active_exits = [bool(a) for a in active]
        self.reference_n = len(losses)
        self.reference_mean = float(losses.mean()) if len(losses) else math.nan
        self.reference_sd = float(losses.std(ddof=1)) if len(losses) > 1 else math.nan
        self.cusum, self.explored = 0.0, 0
        self.drift_flagged = False

    # -- serialisation -----------------------------------------------------------------------
    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, int | float | bool | str | list]]:
        """(arrays, scalars): numpy arrays for an ArrayRecord, plain values for a ConfigRecord.
        `from_arrays(*state.to_arrays())` gives back an identical state."""
        arrays, scalars = {}, {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "exits":
                scalars["has_exits"] = value is not None
                for name, tensor in (value or {}).items():
                    arrays[f"exits.{name}"] = tensor.detach().cpu().numpy().copy()
            elif isinstance(value, np.ndarray):
                arrays[f.name] = value.copy()
            elif isinstance(value, tuple):
                scalars[f.name] = [int(v) for v in value]
            elif isinstance(value, list):
                scalars[f.name] = [bool(v) for v in value]
            else:
                scalars[f.name] = value
        return arrays, scalars

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], scalars: dict) -> UserState:
        values = {}
        for f in fields(cls):
            if f.name == "exits":
                exits = {
                    k[len("exits.") :]: torch.from_numpy(np.array(v))
                    for k, v in arrays.items()
                    if k.startswith("exits.")
                }
                values["exits"] = exits if scalars["has_exits"] else None
            elif f.name in arrays:
                values[f.name] = np.array(arrays[f.name])
            else:
                values[f.name] = scalars[f.name]
        values["image_shape"] = tuple(values["image_shape"])
        values["active_exits"] = list(values["active_exits"])
        return cls(**values)

    def nbytes(self) -> int:
        """Bytes of the arrays (what dominates the state's size)."""
        return sum(a.nbytes for a in self.to_arrays()[0].values())


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
