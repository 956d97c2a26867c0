"""The paper's Orchestrator (PersEPhonEE section 3.4): one user's lifelong state and its rules.

Three phases:
- *Inference*: every input is served by the selected (active) exits at the active threshold.
- *Exploration*: with probability `p_expl` an input also runs to the final exit; the loss of every
  active early exit against the final exit's top-1 joins a window of the last `window` explored
  inputs. If, over a full window, an exit's mean loss is higher than at calibration time (by a
  factor `1 + loss_increase` and by `loss_z` standard errors) the input distribution has probably
  shifted: the drift is flagged, the threshold is raised to `raised_threshold` (thr': more inputs
  reach the fail-safe) and personalisation is scheduled on the samples that arrived since the
  window's oldest explored input. The rule is checked every `check_every` inputs, so a drift can
  be caught on the day it starts; a window counted in inputs, not days, reacts as fast on a busy
  day as on a quiet one.
- *Personalisation*, overnight, when the on-device buffer holds at least one personalisation batch
  and either `min_new_samples` new samples arrived since the last personalisation (section 4.3:
  below that, the exits gain little; `accuracy_vs_samples` measures it) or the active threshold
  is at least `threshold_deviation` above the calibrated one (a flagged drift). Then the exits are
  recalibrated (`engine.calibrate`) and re-profiled, the statistics restart from the new
  reference, and the threshold returns to the calibrated one.

The state is plain numbers and arrays (`UserState.to_arrays` / `UserState.from_arrays`), so it can
live in Flower's Context.state between rounds (one round = one day).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ..errors import SettingsError


@dataclass(frozen=True)
class OrchestratorConfig:
    """Parameters of the Orchestrator; the module docstring says what each rule does."""

    p_expl: float = 0.2  # probability that an input also runs to the final exit
    window: int = 8  # the drift rule averages the last this many explored inputs
    loss_increase: float = 0.5  # drift: window mean loss > (1 + this) x calibration mean ...
    loss_z: float = 2.0  # ... and above it by this many standard errors
    raised_threshold: float = 1.0  # thr' while a drift is flagged (1.0: every input to the final exit)
    check_every: int = 10  # inputs between two checks of the drift rule within a day
    min_new_samples: int = 60  # personalise once this many new samples are buffered ...
    threshold_deviation: float = 0.2  # ... or once thr' is this far above the calibrated threshold
    restart_on_drift: bool = True  # drift-triggered personalisation starts from the shared exits

    def __post_init__(self):
        checks = [
            ("p_expl", 0 <= self.p_expl <= 1, "in [0, 1]"),
            ("window", self.window >= 2, "an integer >= 2"),
            ("loss_increase", self.loss_increase >= 0, ">= 0"),
            ("loss_z", self.loss_z >= 0, ">= 0"),
            ("raised_threshold", 0 <= self.raised_threshold <= 1, "in [0, 1]"),
            ("check_every", self.check_every >= 1, "an integer >= 1"),
            ("min_new_samples", self.min_new_samples >= 1, "an integer >= 1"),
            ("threshold_deviation", 0 <= self.threshold_deviation <= 1, "in [0, 1]"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise SettingsError(f"orchestrator.{name} must be {expected}, got {getattr(self, name)!r}")


def _empty_images(image_shape) -> np.ndarray:
    return np.zeros((0, *image_shape), np.uint8)


@dataclass
class UserState:
    """Everything a device keeps about itself between days. Arrays are numpy; `exits` is None
    while the user runs the shared exits. `active_exits` all False and threshold 1.0 until the
    first calibration: every input goes to the fail-safe."""

    num_exits: int
    image_shape: tuple[int, ...]
    window: int
    day: int = 0  # the next day to live
    exits: dict[str, torch.Tensor] | None = None  # the heads that differ from the shared ones
    calibrated: bool = False
    threshold: float = 1.0  # active threshold (thr' while a drift is flagged)
    calibrated_threshold: float = 1.0
    active_exits: list[bool] = field(default_factory=list)
    reference_mean: np.ndarray = None  # (M,) mean loss of each exit vs the final at calibration
    reference_var: np.ndarray = None  # (M,) its variance across calibration samples
    reference_n: int = 0
    window_losses: np.ndarray = None  # (window, M): losses of the last explored inputs (a ring)
    window_days: np.ndarray = None  # (window,): the day each of them arrived
    explored: int = 0  # inputs explored since the last calibration
    drift_flagged: bool = False
    flagged_day: int = -1
    train_from_day: int = 0  # personalisation uses buffered samples that arrived from this day on
    new_samples: int = 0  # buffered since the last personalisation
    personalisations: int = 0
    last_personalised_day: int = -1
    calibration_accuracy: float = math.nan  # profile at the last calibration (its split)
    calibration_mflops: float = math.nan
    buffer_images: np.ndarray = None  # uint8 (B, C, H, W), oldest first
    buffer_labels: np.ndarray = None  # int64 (B,), -1 where the device has no label
    buffer_labelled: np.ndarray = None  # bool (B,)
    buffer_day: np.ndarray = None  # int64 (B,): arrival day

    def __post_init__(self):
        m, w = self.num_exits, self.window
        self.image_shape = tuple(int(s) for s in self.image_shape)
        if not self.active_exits:
            self.active_exits = [False] * m
        defaults = {
            "reference_mean": np.zeros(m),
            "reference_var": np.zeros(m),
            "window_losses": np.zeros((w, m)),
            "window_days": np.zeros(w, np.int64),
            "buffer_images": _empty_images(self.image_shape),
            "buffer_labels": np.zeros(0, np.int64),
            "buffer_labelled": np.zeros(0, bool),
            "buffer_day": np.zeros(0, np.int64),
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
        moves it to the start of the window that showed the drift)."""
        return np.flatnonzero(self.buffer_day >= self.train_from_day)

    # -- exploration statistics --------------------------------------------------------------
    def explore(self, losses: np.ndarray) -> None:
        """Add explored inputs' losses, (n, M), to the window (inactive exits' columns are kept
        but never judged)."""
        for row in losses:
            slot = self.explored % self.window
            self.window_losses[slot] = row
            self.window_days[slot] = self.day
            self.explored += 1

    def window_mean(self) -> np.ndarray:
        n = min(self.explored, self.window)
        return self.window_losses[:n].mean(axis=0) if n else np.full(self.num_exits, math.nan)

    def drift_rule(self, config: OrchestratorConfig) -> bool:
        """True if an active exit's pooled exploration loss is above its calibration reference
        by the factor and the number of standard errors the config asks for."""
        n = self.window
        if not self.calibrated or self.explored < n or self.reference_n < 2:
            return False
        mean = self.window_mean()
        se = np.sqrt(self.reference_var * (1.0 / n + 1.0 / self.reference_n))
        above = (mean > (1 + config.loss_increase) * self.reference_mean) & (
            mean - self.reference_mean > config.loss_z * se
        )
        return bool((above & np.asarray(self.active_exits, bool)).any())

    def flag_drift(self, config: OrchestratorConfig) -> None:
        self.drift_flagged = True
        self.flagged_day = self.day
        self.threshold = max(self.threshold, config.raised_threshold)
        self.train_from_day = max(self.train_from_day, int(self.window_days.min()))

    def recalibrated(self, threshold: float, active: list[bool], losses: np.ndarray) -> None:
        """A new calibration: threshold and exits from `engine.calibrate`, reference statistics
        from `losses` (n, M) of the calibration samples; exploration restarts."""
        self.calibrated = True
        self.threshold = self.calibrated_threshold = float(threshold)
        self.active_exits = [bool(a) for a in active]
        self.reference_n = len(losses)
        self.reference_mean = losses.mean(axis=0).astype(np.float64)
        self.reference_var = (
            losses.var(axis=0, ddof=1).astype(np.float64) if len(losses) > 1 else 0 * self.reference_mean
        )
        self.window_losses[:] = 0.0
        self.window_days[:] = 0
        self.explored = 0
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


def exploration_losses(probs: torch.Tensor) -> np.ndarray:
    """(n, M) cross-entropy of every early exit against the final exit's top-1, from the softmax
    of every exit (M+1, n, classes): the exploration phase's loss, no labels needed."""
    final_top1 = probs[-1].argmax(-1)
    picked = probs[:-1].gather(2, final_top1[None, :, None].expand(probs.shape[0] - 1, -1, 1))[..., 0]
    return (-picked.clamp_min(1e-12).log()).T.double().numpy()
