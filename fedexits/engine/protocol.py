"""The paper's per-user protocol, in one call: evaluate every exit, personalise, evaluate again,
calibrate the threshold and measure what it buys. The Flower client and the in-process loop both
run exactly this."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .calibration import CalibrationConfig, ExitCosts, apply_calibration, calibrate, sweep
from .features import FrozenFeatures
from .inference import exit_accuracies, exit_probabilities
from .personalise import METHODS, PersonalisationConfig, split_validation
from .profiling import peak_memory_mb


@dataclass(frozen=True)
class UserProtocol:
    method: str = "exits"  # personalisation method: exits | final | full | none
    drop_tolerance_pp: float = 1.0
    prune_exits: bool = True
    profile_memory: bool = False  # peak tensor memory of personalisation (slows it ~2x)
    calibration_margin_z: float = 0.0  # standard errors added to the calibration's drop
    # The whole calibration setting; when given it replaces the three fields above (None: rule
    # "margin" with calibration_margin_z, i.e. "plain" at z=0, as before).
    calibration: CalibrationConfig | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"personalisation method must be one of {sorted(METHODS)}, got {self.method!r}")
        if not self.drop_tolerance_pp >= 0:
            raise ValueError(f"drop tolerance must be >= 0 percentage points, got {self.drop_tolerance_pp}")
        if not self.calibration_margin_z >= 0:
            margin = self.calibration_margin_z
            raise ValueError(f"calibration margin must be >= 0 standard errors, got {margin}")


def run_user(
    model,
    cost_table,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    config: PersonalisationConfig,
    protocol: UserProtocol = UserProtocol(),
    latency: ExitCosts | None = None,
) -> dict:
    """Personalise `model` in place on one user and return plain, JSON-able results.

    `train` is (x, y, labelled) of the personalisation split, `test` is (x, y). The threshold is
    calibrated on the guard's validation split (or the personalisation split without a guard),
    then evaluated on the test split.
    """
    x, y, labelled = train
    x_test, y_test = test
    if len(x_test) == 0:
        raise ValueError("user has no test images")
    model.eval()
    # The backbone is frozen (for the exits method): test features are computed once.
    frozen = protocol.method in ("exits", "none")
    test_features = FrozenFeatures(model, x_test) if frozen else None
    before = exit_accuracies(_probabilities(model, x_test, test_features), y_test)
    personalise = METHODS[protocol.method]
    if protocol.profile_memory:  # exact, but slows personalisation (and its timing) ~2x
        result, peak_mb = peak_memory_mb(lambda: personalise(model, x, y, labelled, config))
    else:
        result, peak_mb = personalise(model, x, y, labelled, config), float("nan")
    probs_test = _probabilities(model, x_test, test_features)
    after = exit_accuracies(probs_test, y_test)

    if protocol.method == "exits" and config.guard:
        _, calib_idx = split_validation(len(x), config.val_fraction, config.seed)
    else:
        calib_idx = torch.arange(len(x))
    probs_calib = exit_probabilities(model, x[calib_idx])
    final_pred = probs_calib[-1].argmax(-1)
    targets = torch.where(labelled[calib_idx], y[calib_idx], final_pred)
    calibration = calibrate(probs_calib, targets, cost_table, latency, calibration_config(protocol))
    at_threshold = apply_calibration(probs_test, y_test, calibration, cost_table, latency)
    test_sweep = sweep(probs_test, y_test, ExitCosts.flops(cost_table), calibration.active_exits, latency)
    num_exits = model.num_exits
    out = {
        "accuracy_before": before,
        "accuracy_after": after,
        "guard_fired": [int(f) for f in result.guard_fired] or [-1] * num_exits,
        "personalise_s": result.seconds,
        "peak_memory_mb": peak_mb,
        "n_train": len(x),
        "n_test": len(x_test),
        "n_labelled": int(labelled.sum()),
        "threshold": calibration.threshold,
        "active_exits": [int(a) for a in calibration.active_exits],
        "accuracy_at_threshold": float(at_threshold["accuracy"]),
        "final_accuracy": after[-1],
        "expected_mflops": float(at_threshold["expected_mflops"]),
        "speedup": calibration.full_mflops / float(at_threshold["expected_mflops"]),
        "sweep_threshold": test_sweep["threshold"].tolist(),
        "sweep_accuracy": test_sweep["accuracy"].tolist(),
        "sweep_mflops": test_sweep["expected_mflops"].tolist(),
    }
    if latency is not None:
        out["expected_latency_ms"] = float(at_threshold["expected_latency_ms"])
        out["latency_speedup"] = latency.full / out["expected_latency_ms"]
        out["sweep_latency_ms"] = test_sweep["expected_latency_ms"].tolist()
    return out


def calibration_config(protocol: UserProtocol) -> CalibrationConfig:
    """The protocol's calibration setting (the legacy fields map to rule "margin")."""
    if protocol.calibration is not None:
        return protocol.calibration
    return CalibrationConfig(
        rule="margin",
        margin_z=protocol.calibration_margin_z,
        drop_tolerance_pp=protocol.drop_tolerance_pp,
        prune_exits=protocol.prune_exits,
    )


def _probabilities(model, x, features: FrozenFeatures | None) -> torch.Tensor:
    return exit_probabilities(model, x) if features is None else features.exit_probabilities()


def user_seed(seed: int, user_id: str) -> int:
    """A per-user seed that does not depend on process, order or Python's hash salt."""
    import zlib

    return (seed * 1_000_003 + zlib.crc32(user_id.encode())) % 2**31


def personalisation_for_user(config: PersonalisationConfig, seed: int, user_id: str) -> PersonalisationConfig:
    return replace(config, seed=user_seed(seed, user_id))
