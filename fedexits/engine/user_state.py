"""One user's lifelong state (engine.orchestrator's rules act on it): the buffer, the
exploration statistic, the drift flag and the personalised exits, as plain numbers and arrays
(`to_arrays` / `from_arrays`) so it can live in Flower's Context.state between rounds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .orchestrator import OrchestratorConfig
from .shift_tests import diagonal_z, hotelling_z, reference_summary

SD_FLOOR = 0.25  # a calibration spread of the statistic below this is treated as this (no division by ~0)


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
