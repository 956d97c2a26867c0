"""The paper's per-user protocol, in one call: evaluate every exit, personalise, evaluate again,
calibrate the threshold and measure what it buys. The Flower client and the in-process loop both
run exactly this (through `fedexits.study.worker`); it also works on its own in a notebook."""

from __future__ import annotations

import torch

from ..data.split import stable_seed
from ..engine.calibration import CalibrationConfig, ExitCosts, apply_calibration, calibrate, sweep
from ..engine.features import FrozenFeatures
from ..engine.inference import exit_accuracies, exit_probabilities
from ..engine.out_of_fold import personalise_out_of_fold
from ..engine.personalise import METHODS, PersonalisationConfig, split_validation
from ..engine.profiling import peak_memory_mb
from ..errors import UserDataError
from ..report.records import UserResult


def run_user(
    model,
    cost_table,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    config: PersonalisationConfig,
    calibration: CalibrationConfig | None = None,
    method: str = "exits",
    latency: ExitCosts | None = None,
    profile_memory: bool = False,
) -> UserResult:
    """Personalise `model` in place on one user with `method` (see engine.METHODS) and return
    its numbers.

    `train` is (x, y, labelled) of the personalisation split, `test` is (x, y). The threshold is
    calibrated (`calibration.rule`) on the guard's validation split (or the personalisation split
    without a guard), or with `calibration.route` "out_of_fold" (method "exits") on out-of-fold
    outputs for every personalisation image, then evaluated on the test split. `profile_memory`
    measures the peak tensor memory of personalisation exactly, at about twice its time.
    """
    calibration = calibration or CalibrationConfig()
    x, y, labelled = train
    x_test, y_test = test
    if len(x_test) == 0:
        raise UserDataError("user has no test images")
    model.eval()
    # The backbone is frozen (for the exits method): test features are computed once.
    frozen = method in ("exits", "none")
    test_features = FrozenFeatures(model, x_test) if frozen else None
    before = exit_accuracies(_probabilities(model, x_test, test_features), y_test)
    out_of_fold = method == "exits" and calibration.route == "out_of_fold"
    if out_of_fold:  # every personalisation image decides the guard and the threshold

        def personalise():
            return personalise_out_of_fold(model, x, y, labelled, config, calibration.out_of_fold)
    else:

        def personalise():
            return METHODS[method](model, x, y, labelled, config)

    if profile_memory:  # exact, but slows personalisation (and its timing) ~2x
        outcome, peak_mb = peak_memory_mb(personalise)
    else:
        outcome, peak_mb = personalise(), float("nan")
    result = outcome.personalisation if out_of_fold else outcome
    probs_test = _probabilities(model, x_test, test_features)
    after = exit_accuracies(probs_test, y_test)

    if out_of_fold:
        probs_calib, targets = outcome.probs, outcome.targets
    else:
        if method == "exits" and config.guard:
            _, calib_idx = split_validation(len(x), config.val_fraction, config.seed)
        else:
            calib_idx = torch.arange(len(x))
        probs_calib = exit_probabilities(model, x[calib_idx])
        targets = torch.where(labelled[calib_idx], y[calib_idx], probs_calib[-1].argmax(-1))
    chosen = calibrate(probs_calib, targets, cost_table, latency, calibration)
    at_threshold = apply_calibration(probs_test, y_test, chosen, cost_table, latency)
    test_sweep = sweep(probs_test, y_test, ExitCosts.flops(cost_table), chosen.active_exits, latency)
    out = UserResult(
        accuracy_before=before,
        accuracy_after=after,
        guard_fired=[int(f) for f in result.guard_fired] or [-1] * model.num_exits,
        personalise_s=result.seconds,
        peak_memory_mb=peak_mb,
        n_train=len(x),
        n_test=len(x_test),
        n_labelled=int(labelled.sum()),
        threshold=chosen.threshold,
        active_exits=[int(a) for a in chosen.active_exits],
        accuracy_at_threshold=float(at_threshold["accuracy"]),
        final_accuracy=after[-1],
        expected_mflops=float(at_threshold["expected_mflops"]),
        speedup=chosen.full_mflops / float(at_threshold["expected_mflops"]),
        sweep_threshold=test_sweep["threshold"].tolist(),
        sweep_accuracy=test_sweep["accuracy"].tolist(),
        sweep_mflops=test_sweep["expected_mflops"].tolist(),
        n_calibration=chosen.n_calibration,
        calibration_p_value=float("nan") if chosen.p_value is None else chosen.p_value,
    )
    if latency is not None:
        out.latency_ms = [b + h for b, h in zip(latency.backbone, latency.heads)]
        out.expected_latency_ms = float(at_threshold["expected_latency_ms"])
        out.latency_speedup = latency.full / out.expected_latency_ms
        out.sweep_latency_ms = test_sweep["expected_latency_ms"].tolist()
    return out


def _probabilities(model, x, features: FrozenFeatures | None) -> torch.Tensor:
    return exit_probabilities(model, x) if features is None else features.exit_probabilities()


def user_seed(seed: int, user_id: str, *purpose) -> int:
    """A seed for one user (and purpose, e.g. a federated round) that does not depend on the
    process, the order of users or Python's hash salt; distinct inputs give distinct seeds (a
    hash of all parts, not arithmetic on them: seed 0 round 2 is not seed 1 round 1)."""
    return stable_seed(seed, user_id, *purpose) % 2**31
