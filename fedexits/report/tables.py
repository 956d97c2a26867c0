"""Aggregate the simulation's per-user results into per-exit and per-init tables and a summary.

Everything is per init (global / federated / scratch) because the three exit initialisations are
compared on the same held-out users. Users are compared with themselves: "helped" means the same
user's personalised accuracy at an exit beats its non-personalised accuracy at that exit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedexits.report.files import to_jsonable
from fedexits.report.promise import promise_summary
from fedexits.report.schema import (
    REQUIRED_PER_USER,
    REQUIRED_THRESHOLDS,
    STAGE_AFTER,
    STAGE_BEFORE,
    ordered_inits,
    require_columns,
)

# Accuracies are ratios of counts; anything closer than this is the same accuracy.
UNCHANGED_TOLERANCE = 1e-9

EXIT_TABLE_COLUMNS = [
    "init", "exit", "is_final", "n_users", "mflops", "params", "latency_ms",
    "accuracy_before_mean", "accuracy_before_median", "accuracy_after_mean",
    "accuracy_after_median", "gain_pp_mean", "share_helped", "share_hurt", "share_unchanged",
    "share_guard_fired",
]  # fmt: skip
THRESHOLD_TABLE_COLUMNS = [
    "init", "n_users", "threshold_mean", "threshold_median", "accuracy_mean", "accuracy_median",
    "final_accuracy_mean", "accuracy_drop_pp_mean", "speedup_mean", "speedup_median",
    "latency_speedup_mean", "latency_speedup_median", "expected_mflops_mean",
    "expected_latency_ms_mean",
]  # fmt: skip

_FLAG_VALUES = {True: 1.0, False: 0.0, "True": 1.0, "False": 0.0, "true": 1.0, "false": 0.0}


def flag_as_float(series: pd.Series) -> pd.Series:
    """bool / NA / "True" strings -> 1.0 / 0.0 / NaN, so means give shares and skip unknowns."""
    return series.map(_FLAG_VALUES).astype(float)


def sort_by_init(frame: pd.DataFrame, then: list[str] | None = None) -> pd.DataFrame:
    """Rows in the paper's init order (global, federated, scratch), then by `then` columns."""
    if frame.empty:
        return frame.reset_index(drop=True)
    rank = {init: position for position, init in enumerate(ordered_inits(frame["init"]))}
    keys = frame["init"].map(rank).rename("_init_rank")
    ordered = frame.assign(_init_rank=keys).sort_values(["_init_rank", *(then or [])])
    return ordered.drop(columns="_init_rank").reset_index(drop=True)


def exit_table(per_user: pd.DataFrame) -> pd.DataFrame:
    """One row per init x exit: accuracy before/after (mean, median), mean gain in percentage
    points, shares of users helped / hurt / unchanged, share of users whose guard fired, and the
    exit's cost (MFLOPs, parameters, latency)."""
    if per_user is None or per_user.empty:
        return pd.DataFrame(columns=EXIT_TABLE_COLUMNS)
    require_columns(per_user, REQUIRED_PER_USER, "per_user")
    frame = per_user.assign(init=per_user["init"].astype(str), exit=per_user["exit"].astype(int))

    accuracy = (
        frame.groupby(["init", "exit", "user", "stage"])["accuracy"]
        .mean()
        .unstack("stage")
        .reindex(columns=[STAGE_BEFORE, STAGE_AFTER])
    )
    gain = accuracy[STAGE_AFTER] - accuracy[STAGE_BEFORE]
    paired = gain.notna()
    per_user_exit = pd.DataFrame(
        {
            "before": accuracy[STAGE_BEFORE],
            "after": accuracy[STAGE_AFTER],
            "gain_pp": gain * 100.0,
            "helped": (gain > UNCHANGED_TOLERANCE).astype(float).where(paired),
            "hurt": (gain < -UNCHANGED_TOLERANCE).astype(float).where(paired),
            "unchanged": (gain.abs() <= UNCHANGED_TOLERANCE).astype(float).where(paired),
        }
    )
    table = per_user_exit.groupby(level=["init", "exit"]).agg(
        n_users=("before", "size"),
        accuracy_before_mean=("before", "mean"),
        accuracy_before_median=("before", "median"),
        accuracy_after_mean=("after", "mean"),
        accuracy_after_median=("after", "median"),
        gain_pp_mean=("gain_pp", "mean"),
        share_helped=("helped", "mean"),
        share_hurt=("hurt", "mean"),
        share_unchanged=("unchanged", "mean"),
    )

    cost_columns = [c for c in ("mflops", "params", "latency_ms") if c in frame.columns]
    costs = frame.groupby(["init", "exit"])[cost_columns].mean()
    table = table.join(costs)
    if "guard_fired" in frame.columns:
        after_rows = frame[frame["stage"] == STAGE_AFTER]
        guard = (
            flag_as_float(after_rows["guard_fired"])
            .groupby([after_rows["init"], after_rows["exit"], after_rows["user"]])
            .max()
        )  # a user counts once per exit, whatever the number of rows
        table = table.join(guard.groupby(level=["init", "exit"]).mean().rename("share_guard_fired"))

    table = table.reset_index()
    table["is_final"] = table["exit"] == table.groupby("init")["exit"].transform("max")
    table = table.reindex(columns=EXIT_TABLE_COLUMNS)
    return sort_by_init(table, then=["exit"])


def threshold_table(thresholds: pd.DataFrame) -> pd.DataFrame:
    """One row per init: chosen threshold, accuracy at it versus the final exit, and the
    speedups (MFLOPs and latency) it buys, as means and medians over users."""
    if thresholds is None or thresholds.empty:
        return pd.DataFrame(columns=THRESHOLD_TABLE_COLUMNS)
    require_columns(thresholds, REQUIRED_THRESHOLDS, "thresholds")
    frame = thresholds.assign(
        init=thresholds["init"].astype(str),
        accuracy_drop_pp=(thresholds["final_accuracy"] - thresholds["accuracy"]) * 100.0,
    )
    wanted = {
        "n_users": ("user", "nunique"),
        "threshold_mean": ("threshold", "mean"),
        "threshold_median": ("threshold", "median"),
        "accuracy_mean": ("accuracy", "mean"),
        "accuracy_median": ("accuracy", "median"),
        "final_accuracy_mean": ("final_accuracy", "mean"),
        "accuracy_drop_pp_mean": ("accuracy_drop_pp", "mean"),
        "speedup_mean": ("speedup", "mean"),
        "speedup_median": ("speedup", "median"),
        "latency_speedup_mean": ("latency_speedup", "mean"),
        "latency_speedup_median": ("latency_speedup", "median"),
        "expected_mflops_mean": ("expected_mflops", "mean"),
        "expected_latency_ms_mean": ("expected_latency_ms", "mean"),
    }
    available = {name: spec for name, spec in wanted.items() if spec[0] in frame.columns}
    table = frame.groupby("init").agg(**available).reset_index()
    return sort_by_init(table.reindex(columns=THRESHOLD_TABLE_COLUMNS))


def _user_runs(frame: pd.DataFrame | None) -> pd.DataFrame:
    """Distinct (user, init) pairs, as strings."""
    if frame is None or frame.empty or not {"user", "init"} <= set(frame.columns):
        return pd.DataFrame({"user": pd.Series(dtype=str), "init": pd.Series(dtype=str)})
    return frame[["user", "init"]].astype(str).drop_duplicates()


def _ok_and_failed_runs(per_user, failures) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A user x init with results is ok unless it is also listed as failed."""
    with_results = _user_runs(per_user)
    failed = _user_runs(failures)
    marked = with_results.merge(failed, on=["user", "init"], how="left", indicator=True)
    return marked[marked["_merge"] == "left_only"].drop(columns="_merge"), failed


def _mean_personalise_seconds(per_user: pd.DataFrame) -> pd.Series:
    """Mean over users of the per user x init personalisation time (repeated on every row)."""
    if per_user is None or per_user.empty or "personalise_s" not in per_user.columns:
        return pd.Series(dtype=float)
    frame = per_user.assign(init=per_user["init"].astype(str))
    per_run = frame.groupby(["init", "user"])["personalise_s"].first()
    return per_run.groupby(level="init").mean()


def _threshold_record(row: pd.Series) -> dict:
    """A threshold_table row as JSON (the user count as an int, not the row's float dtype)."""
    record = to_jsonable(row.to_dict())
    if record.get("n_users") is not None:
        record["n_users"] = int(record["n_users"])
    return record


def _records(table: pd.DataFrame) -> list[dict]:
    return to_jsonable(table.to_dict("records"))


def summarise(
    per_user: pd.DataFrame,
    thresholds: pd.DataFrame,
    failures: pd.DataFrame | None,
    meta: dict | None,
) -> dict:
    """The headline numbers for summary.json, nested by init.

    Per init: users ok / failed, per-exit accuracy before and after (mean, median), shares
    helped / hurt, the early exits' mean gain, and the mean speedup at the drop tolerance.
    Top level: user counts over all inits, the drop tolerance, times and the run's setup.
    A user counts as failed overall if it failed for at least one init.
    """
    meta = dict(meta or {})
    exits = exit_table(per_user)
    by_threshold = threshold_table(thresholds).set_index("init")
    ok_runs, failed_runs = _ok_and_failed_runs(per_user, failures)
    ok_count = ok_runs.groupby("init")["user"].nunique()
    failed_count = failed_runs.groupby("init")["user"].nunique()
    personalise_seconds = _mean_personalise_seconds(per_user)

    inits = ordered_inits(
        set(exits["init"]) | set(by_threshold.index) | set(ok_runs["init"]) | set(failed_runs["init"])
    )
    per_init = {}
    for init in inits:  # a handful of inits; all per-row work is done by the groupbys above
        init_exits = exits[exits["init"] == init]
        early = init_exits[~init_exits["is_final"].astype(bool)]
        chosen = by_threshold.loc[init] if init in by_threshold.index else pd.Series(dtype=float)
        per_init[init] = {
            "users_ok": int(ok_count.get(init, 0)),
            "users_failed": int(failed_count.get(init, 0)),
            "final_exit": init_exits["exit"].max() if len(init_exits) else None,
            "early_exit_accuracy_before_mean": early["accuracy_before_mean"].mean(),
            "early_exit_accuracy_after_mean": early["accuracy_after_mean"].mean(),
            "early_exit_gain_pp_mean": early["gain_pp_mean"].mean(),
            "mean_threshold": chosen.get("threshold_mean", np.nan),
            "mean_accuracy_at_threshold": chosen.get("accuracy_mean", np.nan),
            "mean_final_accuracy": chosen.get("final_accuracy_mean", np.nan),
            "mean_speedup": chosen.get("speedup_mean", np.nan),
            "mean_latency_speedup": chosen.get("latency_speedup_mean", np.nan),
            "mean_personalise_s": personalise_seconds.get(init, np.nan),
            "exits": _records(init_exits.drop(columns="init")),
            "thresholds": _threshold_record(chosen),
        }

    failed_users = set(failed_runs["user"])
    ok_users = set(ok_runs["user"]) - failed_users
    return to_jsonable(
        {
            "users": {
                "total": len(ok_users | failed_users),
                "ok": len(ok_users),
                "failed": len(failed_users),
            },
            "user_runs": {"ok": len(ok_runs), "failed": len(failed_runs)},
            "drop_tolerance_pp": (meta.get("calibration") or {}).get("drop_tolerance_pp"),
            "calibration_promise": promise_summary(thresholds, meta.get("calibration")),
            "status": (meta.get("status") or {}).get("status"),
            "times": meta.get("timings", {}),
            "inits": per_init,
            "meta": meta,
        }
    )
