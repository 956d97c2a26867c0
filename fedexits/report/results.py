"""Per-user protocol results (plain dicts) -> the report's tables.

A record is {"user", "init", "result": dict from `engine.protocol.run_user` or None,
"error": str or None, "notes": list[str]}. Both the Flower server and the in-process loop
produce records, so the tables do not depend on how users were run.
"""

from __future__ import annotations

import pandas as pd


def build_frames(records: list[dict], cost_table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """per_user, thresholds, sweep and failures tables (schema: fedexits.report.schema)."""
    per_user, thresholds, sweep, failures = [], [], [], []
    final_exit = len(cost_table) - 1
    mflops, params = cost_table["mflops"].tolist(), cost_table["params"].tolist()
    for record in records:
        user, init, result = str(record["user"]), str(record["init"]), record.get("result")
        if result is None:
            failures.append({"user": user, "init": init, "error": record.get("error") or "unknown error"})
            continue
        common = {
            "user": user,
            "init": init,
            "n_train": int(result["n_train"]),
            "n_test": int(result["n_test"]),
            "n_labelled": int(result["n_labelled"]),
            "personalise_s": float(result["personalise_s"]),
        }
        latency = result.get("latency_ms") or [float("nan")] * (final_exit + 1)
        for stage, key in (("global", "accuracy_before"), ("personalised", "accuracy_after")):
            for k, accuracy in enumerate(result[key]):
                guard = pd.NA
                if stage == "personalised" and k < final_exit and result["guard_fired"][k] >= 0:
                    guard = bool(result["guard_fired"][k])
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
                "threshold": result["threshold"],
                "accuracy": result["accuracy_at_threshold"],
                "final_accuracy": result["final_accuracy"],
                "expected_mflops": result["expected_mflops"],
                "speedup": result["speedup"],
                "expected_latency_ms": result.get("expected_latency_ms", float("nan")),
                "latency_speedup": result.get("latency_speedup", float("nan")),
                "active_exits": "".join(str(int(a)) for a in result["active_exits"]),
                "peak_memory_mb": result.get("peak_memory_mb", float("nan")),
                "notes": "; ".join(record.get("notes") or []),
            }
        )
        latencies = result.get("sweep_latency_ms") or [float("nan")] * len(result["sweep_threshold"])
        for t, acc, mf, lat in zip(
            result["sweep_threshold"], result["sweep_accuracy"], result["sweep_mflops"], latencies
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
        "failures": pd.DataFrame(failures, columns=["user", "init", "error"]),
    }
