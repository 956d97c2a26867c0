"""The paper's per-user protocol, in one call: evaluate every exit, personalise, evaluate again,
calibrate the threshold and measure what it buys. The Flower client and the in-process loop both
run exactly this (through `fedexits.study.worker`); it also works on its own in a notebook.

The pruning methods (`run_pruning_user`) follow the same steps where they apply: every exit of
the shared model before; then the user's pruned and retrained network (which replaces the
network: no exits, no threshold, no fail-safe) with its measured cost, and the same at every
level of the pruning sweep (the user's accuracy/cost curve).
"""

from __future__ import annotations

import torch

from ..data.split import stable_seed
from ..engine.calibration import CalibrationConfig, ExitCosts, apply_calibration, calibrate, sweep
from ..engine.channel_pruning import ChannelShare
from ..engine.features import FrozenFeatures
from ..engine.inference import exit_accuracies, exit_probabilities, labels_or_final
from ..engine.latency import LatencySettings
from ..engine.out_of_fold import personalise_out_of_fold
from ..engine.personalise import METHODS, PersonalisationConfig, split_validation
from ..engine.profiling import peak_memory_mb
from ..engine.pruning import PruningConfig, evaluate_networks, final_network, prune_sweep
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
        targets = labels_or_final(probs_calib, y[calib_idx], labelled[calib_idx])
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


def run_pruning_user(
    model,
    cost_table,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    config: PersonalisationConfig,
    pruning: PruningConfig | None = None,
    method: str = "prune_data",
    latency: ExitCosts | None = None,
    latency_settings: LatencySettings | None = None,
    profile_memory: bool = False,
    shares: dict[float, ChannelShare] | None = None,
) -> UserResult:
    """Prune and retrain a copy of `model` for one user (`method`: prune_data or prune_agnostic)
    at `pruning.prune_flops_fraction` and at every other level of `pruning.prune_levels`; the
    shared model is not changed.

    The user's network is the one at `prune_flops_fraction`: its test accuracy, its FLOPs and
    parameters as torch's flop counter measures the pruned model, and its batch-1 latency. The
    latency is measured in the run's runtime (`latency_settings`) round-robin with the unpruned
    network, and that ratio scales the run's profile of the full network (`latency`, measured
    once for the run while no client was running), so it is comparable with the exits'.
    `personalise_s` and the peak memory are those of pruning and retraining at that one level."""
    pruning = pruning or PruningConfig()
    x, y, labelled = train
    x_test, y_test = test
    if len(x_test) == 0:
        raise UserDataError("user has no test images")
    model.eval()
    before = exit_accuracies(FrozenFeatures(model, x_test).exit_probabilities(), y_test)
    levels = pruning.pruned_levels

    def prune(levels_now):
        return prune_sweep(model, x, y, labelled, config, pruning, method, levels_now, shares)

    if profile_memory:  # the user's level alone (exactly as the device would run it), then the rest
        results, peak_mb = peak_memory_mb(lambda: prune(levels[:1]))
        results += prune(levels[1:]) if len(levels) > 1 else []
    else:
        results, peak_mb = prune(levels), float("nan")
    evaluated = evaluate_networks(
        [r.network for r in results], x_test, y_test, final_network(model), latency_settings
    )
    curve = []
    for result, measured in zip(results, evaluated):
        placed = latency.full / measured["latency_speedup"] if latency is not None else measured["latency_ms"]
        curve.append(
            {
                "level": result.prune_flops_fraction,
                "flops_removed": result.flops_removed,
                "channel_ratio": result.channel_ratio,
                "accuracy": measured["accuracy"],
                "mflops": result.mflops,
                "params": result.params,
                "latency_ms": placed,
                "personalise_s": result.seconds,
            }
        )
    chosen, full_mflops = curve[0], float(cost_table["mflops"].iloc[-1])
    num_exits = model.num_exits
    out = UserResult(
        accuracy_before=before,
        accuracy_after=[float("nan")] * num_exits + [chosen["accuracy"]],  # only the network's end
        guard_fired=[-1] * num_exits,
        personalise_s=chosen["personalise_s"],
        peak_memory_mb=peak_mb,
        n_train=len(x),
        n_test=len(x_test),
        n_labelled=int(labelled.sum()),
        threshold=float("nan"),  # no exits: every sample runs the whole pruned network
        active_exits=[0] * num_exits,
        accuracy_at_threshold=chosen["accuracy"],
        final_accuracy=chosen["accuracy"],  # the network's only output: no shared fail-safe left
        expected_mflops=chosen["mflops"],
        speedup=full_mflops / chosen["mflops"],
        sweep_threshold=[],
        sweep_accuracy=[],
        sweep_mflops=[],
        network_mflops=chosen["mflops"],
        network_params=float(chosen["params"]),
        network_latency_ms=chosen["latency_ms"],
        prune_sweep=curve,
    )
    if latency is not None:
        out.latency_ms = [b + h for b, h in zip(latency.backbone, latency.heads)]
        out.expected_latency_ms = chosen["latency_ms"]
        out.latency_speedup = latency.full / chosen["latency_ms"]
    return out


def _probabilities(model, x, features: FrozenFeatures | None) -> torch.Tensor:
    return exit_probabilities(model, x) if features is None else features.exit_probabilities()


def user_seed(seed: int, user_id: str, *purpose) -> int:
    """A seed for one user (and purpose, e.g. a federated round) that does not depend on the
    process, the order of users or Python's hash salt; distinct inputs give distinct seeds (a
    hash of all parts, not arithmetic on them: seed 0 round 2 is not seed 1 round 1)."""
    return stable_seed(seed, user_id, *purpose) % 2**31
