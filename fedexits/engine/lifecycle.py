"""One user's day under a lifelong policy: serve the day's inputs, explore, buffer, and overnight
personalise / recalibrate as the policy says. No Flower: `run_day` is the per-user, per-day step a
Flower client (one round = one day) or a notebook loop (`run_lifecycle`) calls.

Policies (`POLICIES`), all on the same streams:
- `never`: the shared exits forever; the threshold is calibrated once, on the first `once_days`.
- `once`: today's one-shot protocol: personalise and calibrate once, on the first `once_days`.
- `nightly`: personalise (from the current exits) and recalibrate every night on the buffer.
- `orchestrator`: the paper's Orchestrator (`fedexits.engine.orchestrator`): explore, flag drift,
  personalise only when its rules say so. Before its first personalisation it calibrates the
  shared exits on the first `once_days`, like `never`.
- `orchestrator+fedavg`: the same, but every personalisation starts from the exits the server
  averaged over last night's personalised users (`start_exits`, when there is an average).

Every policy starts on the shared exits at `LifecycleConfig.shared_threshold`, measured across
users (every exit active; each calibration switches off the exits that cost more than they
save). With `own_threshold` a user's calibration (the run's `CalibrationConfig`) replaces it once
it certifies a cheaper one; without a shared threshold (None) every input goes to the final exit
until the first calibration. An explored input ran to the final exit, which answers it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..data.split import rng_for
from ..data.streams import DayInputs
from ..errors import SettingsError
from ..models import cost_table
from .calibration import CalibrationConfig, ExitCosts, exits_taken
from .features import FrozenFeatures
from .lifecycle_config import EXPLORING, POLICIES, LifecycleConfig, check_buffer
from .nights import night
from .orchestrator import exploration_statistic
from .personalise import PersonalisationConfig, training_step_mflops
from .user_state import UserState

TIMING_COLUMNS = ("personalise_s",)  # differ between runs with the same seed


@dataclass
class DayRecord:
    """One row of timeline.csv: one user, one day, one policy."""

    user: str
    day: int
    policy: str
    accuracy: float  # on the day's measured inputs, as served (before tonight's training)
    final_accuracy: float  # the fail-safe's accuracy on the same inputs
    mflops: float  # mean per input, exploration included
    latency_ms: float  # mean per input until the answer (batch-1 profile; nan without one)
    threshold: float  # active threshold at the end of the day (thr' if a drift was flagged)
    drift_active: bool  # the stream has drifted (ground truth)
    drift_flagged: bool  # the orchestrator's drift flag at the end of the day
    personalised: bool  # the exits were personalised tonight
    train_mflops: float  # compute spent tonight on personalisation and calibration
    calibrated_threshold: float = float("nan")
    trigger: str = ""  # what happened tonight: once, nightly, data, drift, reset, calibrate, or ""
    inputs: int = 0
    measured: int = 0
    explored: int = 0
    early_exit_share: float = float("nan")
    explore_loss: float = float("nan")  # today's mean exploration loss (loss rules: selected exits vs final)
    reference_loss: float = float("nan")  # its mean on the calibration samples
    cusum: float = float("nan")  # the drift statistic at the end of the day (its CUSUM S)
    buffered: int = 0
    new_samples: int = 0
    train_samples: int = 0
    personalise_s: float = 0.0
    state_bytes: int = 0  # the user's state arrays after tonight: what Context.state carries for it

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DayOutcome:
    state: UserState
    record: DayRecord
    exits: dict[str, torch.Tensor] | None = None  # tonight's personalised exits (for FedAvg)
    num_samples: int = 0  # samples they were trained on (the FedAvg weight)


class Lifecycle:
    """What every simulated device shares: the frozen model (exits are swapped per user), its
    costs, the settings, and how stored uint8 images become model inputs (`decode`, e.g.
    `population.model_input`). `calibration`: how a user's own samples may certify a threshold
    (the run's `calibration` section; its route is ignored: the lifecycle decides on the
    buffer's validation split)."""

    def __init__(
        self,
        model,
        config: LifecycleConfig,
        personalisation: PersonalisationConfig,
        decode: Callable[[np.ndarray], torch.Tensor],
        calibration: CalibrationConfig | None = None,
        latency: ExitCosts | None = None,
    ):
        check_buffer(config, personalisation)
        self.model = model.eval()
        self.config, self.personalisation, self.decode = config, personalisation, decode
        self.calibration, self.latency = calibration or CalibrationConfig(), latency
        self.shared_exits = copy.deepcopy(model.exits.state_dict())
        self.cost_table = cost_table(model)
        self.flops = ExitCosts.flops(self.cost_table)
        self.heads_mflops = float(sum(self.flops.heads[:-1]))
        self.step_mflops = training_step_mflops(model, personalisation)

    def new_state(self) -> UserState:
        """A new device: the shared exits, every exit active at the shared threshold (or, without
        one, every input to the final exit until the first calibration)."""
        state = UserState(self.model.num_exits, self.model.input_shape)
        if self.config.shared_threshold is not None:
            state.threshold = state.calibrated_threshold = self.config.shared_threshold
            state.active_exits = [True] * self.model.num_exits
        return state

    def load(self, exits: dict[str, torch.Tensor] | None) -> None:
        """The shared exits, overlaid with `exits` (a user keeps only the exits it changed)."""
        self.model.exits.load_state_dict(self.shared_exits)
        if exits:
            self.model.exits.load_state_dict(exits, strict=False)

    def changed_exits(self) -> dict[str, torch.Tensor]:
        """The model's exits that differ from the shared ones (whole heads), copied: what a user's
        state keeps. A head the guard kept at the shared weights costs nothing to store."""
        current = self.model.exits.state_dict()
        changed = {_head(n) for n, t in current.items() if not torch.equal(t, self.shared_exits[n])}
        return {n: t.clone() for n, t in current.items() if _head(n) in changed}

    def calibration_mflops(self, n: int) -> float:
        """A calibration's compute: every exit and the final classifier over `n` samples."""
        return n * (self.flops.full + self.heads_mflops)

    def personalisation_mflops(self, n_train: int, n_val: int, epochs: int | None = None) -> float:
        """Tonight's personalisation compute, derived from the cost table and the flop counter's
        count of one training step: the frozen network once over the samples (feature cache; every
        epoch without it), `epochs` training steps per training sample, the guard's two head
        passes over the validation split and the calibration's full pass over it."""
        p, full = self.personalisation, self.flops.full
        epochs = epochs or p.epochs
        cached = p.cache and not p.augment
        backbone = (n_train + n_val) * full if cached else (epochs * n_train + n_val) * full
        guard = 2 * n_val * self.heads_mflops
        return backbone + epochs * n_train * self.step_mflops + guard + self.calibration_mflops(n_val)


def _head(name: str) -> str:
    return name.split(".", 1)[0]


def day_features(lifecycle: Lifecycle, inputs: DayInputs) -> FrozenFeatures:
    """One backbone pass over a day's inputs; every policy then runs only its own heads."""
    return FrozenFeatures(lifecycle.model, inputs.x)


def run_day(
    policy: str,
    state: UserState,
    lifecycle: Lifecycle,
    inputs: DayInputs,
    start_exits: dict[str, torch.Tensor] | None = None,
    features: FrozenFeatures | None = None,
) -> DayOutcome:
    """Live one day of one user under `policy`; updates `state` in place and returns it with the
    day's record. `start_exits` (orchestrator+fedavg only): the server's average exits, where
    tonight's personalisation starts if it happens. `features`: the frozen network's features of
    `inputs.x` (`day_features`), to share one backbone pass among the policies of a user-day."""
    if policy not in POLICIES:
        raise SettingsError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if start_exits is not None and policy != "orchestrator+fedavg":
        raise ValueError(f"start_exits is for orchestrator+fedavg only, got policy {policy!r}")
    if inputs.day != state.day:
        raise ValueError(
            f"user {inputs.user}: the state is at day {state.day}, the inputs are of day {inputs.day}"
        )
    lifecycle.load(state.exits)
    features = features or day_features(lifecycle, inputs)
    probs = features.exit_probabilities()
    active = list(state.active_exits)
    taken, explored, losses = _serve(policy, state, lifecycle, inputs, probs, features)
    predictions = probs.argmax(-1)
    explored_rows = torch.from_numpy(explored)
    taken[explored_rows] = lifecycle.model.num_exits  # it ran to the final exit: that answer is served
    served = predictions.gather(0, taken[None])[0]
    mflops = lifecycle.flops.per_exit(active)[taken]
    latency = lifecycle.latency.per_exit(active)[taken].mean() if lifecycle.latency else torch.tensor(np.nan)
    measured = inputs.measured
    on = np.asarray(active, bool)
    record = DayRecord(
        user=inputs.user,
        day=inputs.day,
        policy=policy,
        accuracy=_mean(served[measured] == inputs.labels[measured]),
        final_accuracy=_mean(predictions[-1][measured] == inputs.labels[measured]),
        mflops=float(mflops.mean()),
        latency_ms=float(latency),
        threshold=state.threshold,
        drift_active=inputs.drift_active,
        drift_flagged=state.drift_flagged,
        personalised=False,
        train_mflops=0.0,
        inputs=len(inputs),
        measured=int(measured.sum()),
        explored=int(explored.sum()),
        early_exit_share=_mean(taken < lifecycle.model.num_exits),  # explored inputs count as final
    )
    if explored.any() and on.any() and lifecycle.config.orchestrator.statistic != "feature_shift":
        record.explore_loss = float(losses[explored].mean())
    if policy in EXPLORING and state.calibrated and on.any():
        record.cusum = state.cusum
    if state.calibrated and on.any():
        record.reference_loss = state.reference_mean

    if _buffers(policy, state):
        keep = inputs.trainable.numpy()
        state.admit(
            inputs.images[keep],
            inputs.labels.numpy()[keep],
            inputs.labelled.numpy()[keep],
            inputs.day,
            lifecycle.config.buffer_size,
        )
    outcome = DayOutcome(state, record)
    night(policy, state, lifecycle, inputs.user, start_exits, outcome)
    record.calibrated_threshold = state.calibrated_threshold
    record.buffered, record.new_samples = state.buffered, state.new_samples
    record.state_bytes = state.nbytes()
    state.day += 1
    return outcome


def _serve(policy, state: UserState, lifecycle: Lifecycle, inputs: DayInputs, probs, features):
    """Inference and exploration phases: where each input leaves, which inputs were explored and
    their exploration losses (loss rules; nan for feature_shift, which watches every input's
    features instead). The drift rule is checked every `check_every` inputs; once it fires the
    raised threshold serves the rest of the day."""
    config, rules = lifecycle.config, lifecycle.config.orchestrator
    n, active = len(inputs), list(state.active_exits)
    explores = policy in EXPLORING
    explored = np.zeros(n, bool)
    losses = np.full(n, np.nan)
    if explores:
        explored = rng_for(config.seed, "explore", inputs.user, inputs.day).random(n) < rules.p_expl
        if rules.statistic == "feature_shift":
            pooled = features.pooled(grid=rules.shift_grid).double().numpy()
        else:
            losses = exploration_statistic(probs, state.threshold, active, rules.statistic)
    taken = torch.empty(n, dtype=torch.long)
    step = rules.check_every if explores else n
    for start in range(0, n, step):
        at = slice(start, min(n, start + step))
        taken[at] = exits_taken(probs[:, at], torch.tensor([state.threshold], dtype=probs.dtype), active)[0]
        if explores and rules.statistic == "feature_shift":
            state.observe_features(pooled[at], rules.shift_window, rules.shift_slack)
            state.explored += int(explored[at].sum())
        elif explores:
            state.explore(losses[at][explored[at]], rules.cusum_slack)
        if explores and not state.drift_flagged and state.drift_rule(rules):
            state.flag_drift(rules)
    return taken, explored, losses


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean()) if len(values) else float("nan")


def _buffers(policy: str, state: UserState) -> bool:
    if policy == "never":
        return not state.calibrated
    if policy == "once":
        return state.personalisations == 0
    return True
