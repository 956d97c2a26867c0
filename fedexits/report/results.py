"""Per-user records (`fedexits.report.records.UserRecord`) -> the report's tables.

Both the Flower server and the in-process loop produce the same records, so the tables do not
depend on how users were run.
"""

from __future__ import annotations

import pandas as pd

from fedexits.report.records import UserRecord
from fedexits.report.schema import FAILURE_COLUMNS


def build_frames(records: list[UserRecord], cost_table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """per_user, thresholds, sweep and failures tables (schema: fedexits.report.schema)."""
    per_user, thresholds, sweep, failures = [], [], [], []
    final_exit = len(cost_table) - 1
    mflops, params = cost_table["mflops"].tolist(), cost_table["params"].tolist()
    for record in records:
        user, init, result = str(record.user), str(record.init), record.result
        if result is None:
            failure = record.failure
            kind, error = (failure.kind, failure.message) if failure else ("bug", "no result and no error")
            failures.append({"user": user, "init": init, "kind": kind, "error": error})
            continue
        common = {
            "user": user,
            "init": init,
            "n_train": result.n_train,
            "n_test": result.n_test,
            "n_labelled": result.n_labelled,
            "personalise_s": result.personalise_s,
            "n_calibration": result.n_calibration,
        }
        latency = result.latency_ms or [float("nan")] * (final_exit + 1)
        for stage, accuracies in (
            ("global", result.accuracy_before),
            ("personalised", result.accuracy_after),
        ):
            for k, accuracy in enumerate(accuracies):
                guard = pd.NA
                if stage == "personalised" and k < final_exit and result.guard_fired[k] >= 0:
                    guard = bool(result.guard_fired[k])
                per_user.append(
                    {
                        **common,
                        "stage": stage,
                        "exit": k,
                        "accuracy": float(accuracy),
                        "mflops": mflops[k],
                        "params": int(params[k]),
                        "latency_ms": float(latency[k]),
                        "guard_fired": guard,
                    }
                )
        thresholds.append(
            {
                "user": user,
                "init": init,
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
                    "user": user,
                    "init": init,
                    "threshold": t,
                    "accuracy": acc,
                    "expected_mflops": mf,
                    "expected_latency_ms": lat,
                }
            )
    return {
        "per_user": pd.DataFrame(per_user),
        "thresholds": pd.DataFrame(thresholds),
        "sweep": pd.DataFrame(sweep),
        "failures": pd.DataFrame(failures, columns=FAILURE_COLUMNS),
    }
