"""Per-user records (`fedexits.report.records.UserRecord`) -> the report's tables.

Both the Flower server and the in-process loop produce the same records, so the tables do not
depend on how users were run.
"""

from __future__ import annotations

import math

import pandas as pd

from fedexits.report.records import UserRecord
from fedexits.report.schema import FAILURE_COLUMNS, PRUNE_SWEEP_COLUMNS


def build_frames(records: list[UserRecord], cost_table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """per_user, thresholds, sweep, prune_sweep and failures tables (schema:
    fedexits.report.schema).

    A pruning method's personalised stage has one row, at the final exit: the user's pruned
    network (its exits are not used), with the network's own measured MFLOPs, parameters and
    latency instead of the cost table's."""
    per_user, thresholds, sweep, prune_sweep, failures = [], [], [], [], []
    final_exit = len(cost_table) - 1
    mflops, params = cost_table["mflops"].tolist(), cost_table["params"].tolist()
    for record in records:
        user, init, method, result = str(record.user), str(record.init), str(record.method), record.result
        keys = {"user": user, "init": init, "method": method}
        if result is None:
            failure = record.failure
            kind, error = (failure.kind, failure.message) if failure else ("bug", "no result and no error")
            failures.append({**keys, "kind": kind, "error": error})
            continue
        common = {
            **keys,
            "n_train": result.n_train,
            "n_test": result.n_test,
            "n_labelled": result.n_labelled,
            "personalise_s": result.personalise_s,
            "n_calibration": result.n_calibration,
        }
        latency = result.latency_ms or [float("nan")] * (final_exit + 1)
        replaced = not math.isnan(result.network_mflops)  # the network itself changed (pruning)
        for stage, accuracies in (
            ("global", result.accuracy_before),
            ("personalised", result.accuracy_after),
        ):
            for k, accuracy in enumerate(accuracies):
                if math.isnan(accuracy):  # not measured: a pruned network has no early exits
                    continue
                guard = pd.NA
                if stage == "personalised" and k < final_exit and result.guard_fired[k] >= 0:
                    guard = bool(result.guard_fired[k])
                cost = (mflops[k], int(params[k]), float(latency[k]))
                if stage == "personalised" and replaced and k == final_exit:
                    cost = (result.network_mflops, int(result.network_params), result.network_latency_ms)
                per_user.append(
                    {
                        **common,
                        "stage": stage,
                        "exit": k,
                        "accuracy": float(accuracy),
                        "mflops": cost[0],
                        "params": cost[1],
                        "latency_ms": cost[2],
                        "guard_fired": guard,
                    }
                )
        thresholds.append(
            {
                **keys,
                "threshold": result.threshold,
                "accuracy": result.accuracy_at_threshold,
                "final_accuracy": result.final_accuracy,
                "expected_mflops": result.expected_mflops,
                "speedup": result.speedup,
                "expected_latency_ms": result.expected_latency_ms,
                "latency_speedup": result.latency_speedup,
                "active_exits": "".join(str(int(a)) for a in result.active_exits),
                "n_calibration": result.n_calibration,
                "calibration_p_value": result.calibration_p_value,
                "peak_memory_mb": result.peak_memory_mb,
                "notes": "; ".join(record.notes),
            }
        )
        latencies = result.sweep_latency_ms or [float("nan")] * len(result.sweep_threshold)
        for t, acc, mf, lat in zip(
            result.sweep_threshold, result.sweep_accuracy, result.sweep_mflops, latencies
        ):
            sweep.append(
                {
                    **keys,
                    "threshold": t,
                    "accuracy": acc,
                    "expected_mflops": mf,
                    "expected_latency_ms": lat,
                }
            )
        prune_sweep += [{**keys, **point} for point in result.prune_sweep]
    return {
        "per_user": pd.DataFrame(per_user),
        "thresholds": pd.DataFrame(thresholds),
        "sweep": pd.DataFrame(sweep),
        "prune_sweep": pd.DataFrame(prune_sweep, columns=PRUNE_SWEEP_COLUMNS) if prune_sweep else None,
        "failures": pd.DataFrame(failures, columns=FAILURE_COLUMNS),
    }
