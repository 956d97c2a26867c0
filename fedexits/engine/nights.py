"""Overnight, per policy: personalise, recalibrate, or reset a user (`night`), and re-profile
what it will serve. Split from `lifecycle`, which serves the day and calls `night` at its end."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..data.split import stable_seed
from .calibration import calibrate, cost_only_pruning, sweep
from .features import FrozenFeatures
from .inference import exit_accuracies, exit_probabilities, labels_or_final
from .lifecycle_config import EXPLORING, LifecycleConfig
from .orchestrator import exploration_statistic
from .personalise import personalise, split_validation
from .user_state import UserState

if TYPE_CHECKING:
    from .lifecycle import DayOutcome, Lifecycle


def _seed(config: LifecycleConfig, purpose: str, user: str, day: int) -> int:
    return stable_seed(config.seed, purpose, user, day) % 2**31


def night(policy, state: UserState, lifecycle: Lifecycle, user, start_exits, outcome: DayOutcome) -> None:
    """Tonight's personalisation or calibration, as the policy's rules say."""
    config, rules = lifecycle.config, lifecycle.config.orchestrator
    batch = lifecycle.personalisation.batch_size
    rows = state.training_rows()
    first_days_done = state.day >= config.once_days - 1
    current = state.exits
    trigger, start = "", None
    if policy == "never":
        trigger = "calibrate" if not state.calibrated and first_days_done and len(rows) >= batch else ""
    elif policy == "once":
        if state.personalisations == 0 and first_days_done and len(rows) >= batch:
            trigger, start = "once", None
    elif policy == "nightly":
        if len(rows) >= batch:
            trigger, start = "nightly", current
    else:
        deviated = rules.deviated(state.threshold, state.calibrated_threshold)
        if len(rows) >= batch and state.drift_flagged and deviated:
            trigger, start = "drift", (None if rules.restart_on_drift else current)
        elif state.drift_flagged and deviated and config.shared_threshold is not None:
            trigger = "reset"  # too few samples since the drift to personalise: the shared threshold
        elif len(rows) >= batch and state.enough_new_samples(rules):
            trigger, start = "data", current
        elif not state.calibrated and first_days_done and len(rows) >= batch:
            trigger = "calibrate"
        if trigger in ("drift", "data") and start_exits is not None:
            start = start_exits
    outcome.record.trigger = trigger
    if trigger == "reset":
        _reset(state, lifecycle, rows, outcome)
    elif trigger == "calibrate":
        lifecycle.load(state.exits)
        x, y, labelled = _buffered(state, lifecycle, rows)
        _calibrate(state, lifecycle, x, y, labelled)
        outcome.record.train_mflops = lifecycle.calibration_mflops(len(rows))
        outcome.record.train_samples = len(rows)
    elif trigger:
        seed = _seed(config, "lifecycle-personalise", user, state.day)
        own = {"epochs": rules.epochs, "lr": rules.lr} if policy in EXPLORING else {}  # the orchestrators'
        _personalise(state, lifecycle, rows, start, seed, outcome, {k: v for k, v in own.items() if v})
    if trigger and policy in ("never", "once"):
        state.clear_buffer()


def _buffered(state: UserState, lifecycle: Lifecycle, rows: np.ndarray):
    x = lifecycle.decode(state.buffer_images[rows])
    y = torch.from_numpy(state.buffer_labels[rows]).clamp_min(0)  # unknown labels are masked out
    return x, y, torch.from_numpy(state.buffer_labelled[rows])


def _reset(state: UserState, lifecycle: Lifecycle, rows: np.ndarray, outcome: DayOutcome) -> None:
    """A flagged drift without a batch of new samples: back to the shared threshold, with the exits
    `reset_exits` says (`better`: the user's if they beat the shared ones on the samples since the
    drift, a false alarm's likely case), the exploration reference re-based on those samples (the
    rule waits for `min_reference` of them); the data rule personalises once enough have arrived."""
    rules = lifecycle.config.orchestrator
    data = _buffered(state, lifecycle, rows) if len(rows) else None
    keep = rules.reset_exits == "kept" or (rules.reset_exits == "shared" and not rules.restart_on_drift)
    compared = rules.reset_exits == "better" and data is not None and bool(state.exits)
    if compared:
        keep = _exit_accuracy(lifecycle, state.exits, *data) > _exit_accuracy(lifecycle, None, *data)
    if not keep:
        state.exits = None
    lifecycle.load(state.exits)
    if data is not None:
        _calibrate(state, lifecycle, *data)
        # a device calibrates on the chosen exits' pass of the comparison: two passes, not three
        outcome.record.train_mflops += (2 if compared else 1) * lifecycle.calibration_mflops(len(rows))
    else:
        state.recalibrated(lifecycle.config.shared_threshold, [True] * state.num_exits, np.zeros(0))


def _exit_accuracy(lifecycle: Lifecycle, exits, x, y, labelled) -> float:
    """Mean top-1 accuracy of the early exits `exits`; unlabelled samples count the (frozen) final exit's."""
    lifecycle.load(exits)
    probs = exit_probabilities(lifecycle.model, x)
    return float(np.mean(exit_accuracies(probs[:-1], labels_or_final(probs, y, labelled))))


def _calibrate(state: UserState, lifecycle: Lifecycle, x, y, labelled, reference_x=None) -> None:
    """Recalibrate the threshold on (x, y) with the model's current exits and re-profile: the
    calibration's accuracy and cost, and the reference of the drift statistic (for
    `feature_shift`, on `reference_x`: every sample personalisation used, default x). With a
    shared threshold the user keeps it, with the exits that do not cost more than they save
    there (`cost_only_pruning`: confidences and costs, no labels), unless `own_threshold` lets a
    cheaper certificate of the run's calibration rule replace it."""
    probs = exit_probabilities(lifecycle.model, x)
    targets = labels_or_final(probs, y, labelled)
    calibration = calibrate(probs, targets, lifecycle.cost_table, lifecycle.latency, lifecycle.calibration)
    threshold, active = calibration.threshold, calibration.active_exits
    config, shared = lifecycle.config, lifecycle.config.shared_threshold
    certified_cheaper = shared is not None and any(active) and threshold < shared
    if shared is not None and not (config.own_threshold and certified_cheaper):
        threshold, active = shared, [True] * state.num_exits
        if lifecycle.calibration.prune_exits:
            confidence = probs[:-1].max(-1).values
            active = cost_only_pruning(confidence, lifecycle.flops, [threshold])[0].tolist()
    statistic = config.orchestrator.statistic
    if statistic == "feature_shift":
        state.recalibrated(threshold, active, np.zeros(0))
        reference = x if reference_x is None else reference_x
        grid = config.orchestrator.shift_grid
        pooled = FrozenFeatures(lifecycle.model, reference, cache=False).pooled(grid=grid).double().numpy()
        # not charged: on a device these features come with the night's backbone pass over the
        # buffer; the simulation recomputes the first blocks instead of threading them through
        state.set_feature_reference(pooled, config.orchestrator.shift_test)
    else:
        state.recalibrated(threshold, active, exploration_statistic(probs, threshold, active, statistic))
    profile = sweep(probs, targets, lifecycle.flops, active, thresholds=[threshold]).iloc[0]
    state.calibration_accuracy = float(profile["accuracy"])  # the profile of what is served
    state.calibration_mflops = float(profile["expected_mflops"])


def _personalise(
    state: UserState, lifecycle: Lifecycle, rows, start, seed: int, outcome: DayOutcome, own=None
):
    """Tonight's personalisation from `start` on the buffer `rows`, with the settings `own`
    (epochs, lr) in place of the personalisation config's."""
    config = replace(lifecycle.personalisation, seed=seed, **(own or {}))
    x, y, labelled = _buffered(state, lifecycle, rows)
    lifecycle.load(start)
    result = personalise(lifecycle.model, x, y, labelled, config)
    calib = split_validation(len(x), config.val_fraction, seed)[1] if config.guard else torch.arange(len(x))
    _calibrate(state, lifecycle, x[calib], y[calib], labelled[calib], reference_x=x)
    state.personalised(lifecycle.changed_exits(), trained_samples=len(rows))
    record = outcome.record
    record.personalised = True
    record.train_samples = result.n_train
    record.train_mflops = lifecycle.personalisation_mflops(
        result.n_train, len(calib) if config.guard else 0, config.epochs
    )
    record.personalise_s = result.seconds
    outcome.exits = {n: t.clone() for n, t in lifecycle.model.exits.state_dict().items()}
    outcome.num_samples = result.n_train
