"""Aggregate the simulation's per-user results into per-exit and per-run tables and a summary.

Everything is per run, an (init, method) pair: the exit initialisations (global / federated /
scratch) and the personalisation methods (exits, the baselines, pruning) are compared on the
same held-out users. Users are compared with themselves: "helped" means the same user's
personalised accuracy at an exit beats its non-personalised accuracy at that exit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedexits.report.files import to_jsonable
from fedexits.report.promise import promise_summary
from fedexits.report.schema import (
    DEFAULT_METHOD,
    REQUIRED_PER_USER,
    REQUIRED_THRESHOLDS,
    STAGE_AFTER,
    STAGE_BEFORE,
    ordered_inits,
    ordered_methods,
    require_columns,
    with_method,
)

# Accuracies are ratios of counts; anything closer than this is the same accuracy.
UNCHANGED_TOLERANCE = 1e-9

RUN_KEYS = ["init", "method"]
EXIT_TABLE_COLUMNS = [
    "init", "method", "exit", "is_final", "n_users", "mflops", "params", "latency_ms",
    "accuracy_before_mean", "accuracy_before_median", "accuracy_after_mean",
    "accuracy_after_median", "gain_pp_mean", "share_helped", "share_hurt", "share_unchanged",
    "share_guard_fired",
]  # fmt: skip
THRESHOLD_TABLE_COLUMNS = [
    "init", "method", "n_users", "threshold_mean", "threshold_median", "accuracy_mean", "accuracy_median",
    "final_accuracy_mean", "accuracy_drop_pp_mean", "speedup_mean", "speedup_median",
    "latency_speedup_mean", "latency_speedup_median", "expected_mflops_mean",
    "expected_latency_ms_mean",
]  # fmt: skip

_FLAG_VALUES = {True: 1.0, False: 0.0, "True": 1.0, "False": 0.0, "true": 1.0, "false": 0.0}


def flag_as_float(series: pd.Series) -> pd.Series:
    """bool / NA / "True" strings -> 1.0 / 0.0 / NaN, so means give shares and skip unknowns."""
    return series.map(_FLAG_VALUES).astype(float)


def sort_by_init(frame: pd.DataFrame, then: list[str] | None = None) -> pd.DataFrame:
    """Rows in the paper's init order (global, federated, scratch), then by method (exits
    first), then by `then` columns."""
    if frame.empty:
        return frame.reset_index(drop=True)
    ranks = {"_init_rank": frame["init"].map(_rank(ordered_inits(frame["init"])))}
    if "method" in frame.columns:
        ranks["_method_rank"] = frame["method"].map(_rank(ordered_methods(frame["method"])))
    ordered = frame.assign(**ranks).sort_values([*ranks, *(then or [])], kind="stable")
    return ordered.drop(columns=list(ranks)).reset_index(drop=True)


def _rank(ordered: list[str]) -> dict[str, int]:
    return {name: position for position, name in enumerate(ordered)}


def exit_table(per_user: pd.DataFrame) -> pd.DataFrame:
    """One row per run (init x method) x exit: accuracy before/after (mean, median), mean gain in
    percentage points, shares of users helped / hurt / unchanged, share of users whose guard
    fired, and the cost of reaching the exit as the user runs it after personalisation (MFLOPs,
    parameters, latency: a pruned network's own at the final exit; where nothing was measured
    after, e.g. a pruned network's unused early exits, the shared model's)."""
    if per_user is None or per_user.empty:
        return pd.DataFrame(columns=EXIT_TABLE_COLUMNS)
    require_columns(per_user, REQUIRED_PER_USER, "per_user")
    frame = with_method(per_user)
    frame = frame.assign(init=frame["init"].astype(str), exit=frame["exit"].astype(int))
    keys = [*RUN_KEYS, "exit"]

    accuracy = (
        frame.groupby([*keys, "user", "stage"])["accuracy"]
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
    table = per_user_exit.groupby(level=keys).agg(
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
    after_rows = frame[frame["stage"] == STAGE_AFTER]
    costs = after_rows.groupby(keys)[cost_columns].mean()
    costs = costs.combine_first(frame[frame["stage"] == STAGE_BEFORE].groupby(keys)[cost_columns].mean())
    table = table.join(costs)
    if "guard_fired" in frame.columns:
        guard = (
            flag_as_float(after_rows["guard_fired"])
            .groupby([after_rows[key] for key in keys] + [after_rows["user"]])
            .max()
        )  # a user counts once per exit, whatever the number of rows
        table = table.join(guard.groupby(level=keys).mean().rename("share_guard_fired"))

    table = table.reset_index()
    table["is_final"] = table["exit"] == table.groupby(RUN_KEYS)["exit"].transform("max")
    table = table.reindex(columns=EXIT_TABLE_COLUMNS)
    return sort_by_init(table, then=["exit"])


def threshold_table(thresholds: pd.DataFrame) -> pd.DataFrame:
    """One row per run (init x method): chosen threshold, accuracy at it versus the final exit,
    and the speedups (MFLOPs and latency) it buys, as means and medians over users. (A pruning
    method has no threshold: its accuracy and costs are the pruned network's, which is also its
    final exit.)"""
    if thresholds is None or thresholds.empty:
        return pd.DataFrame(columns=THRESHOLD_TABLE_COLUMNS)
    require_columns(thresholds, REQUIRED_THRESHOLDS, "thresholds")
    thresholds = with_method(thresholds)
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
    table = frame.groupby(RUN_KEYS).agg(**available).reset_index()
    return sort_by_init(table.reindex(columns=THRESHOLD_TABLE_COLUMNS))


def _user_runs(frame: pd.DataFrame | None) -> pd.DataFrame:
    """Distinct (user, init, method) triples, as strings."""
    columns = ["user", *RUN_KEYS]
    if frame is None or frame.empty or not {"user", "init"} <= set(frame.columns):
        return pd.DataFrame({column: pd.Series(dtype=str) for column in columns})
    return with_method(frame)[columns].astype(str).drop_duplicates()


def _ok_and_failed_runs(per_user, failures) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A user x init x method with results is ok unless it is also listed as failed."""
    with_results = _user_runs(per_user)
    failed = _user_runs(failures)
    marked = with_results.merge(failed, on=["user", *RUN_KEYS], how="left", indicator=True)
    return marked[marked["_merge"] == "left_only"].drop(columns="_merge"), failed


def _mean_personalise_seconds(per_user: pd.DataFrame) -> pd.Series:
    """Mean over users of the per user x run personalisation time (repeated on every row)."""
    if per_user is None or per_user.empty or "personalise_s" not in per_user.columns:
        return pd.Series(dtype=float)
    frame = with_method(per_user).assign(init=per_user["init"].astype(str))
    per_run = frame.groupby([*RUN_KEYS, "user"])["personalise_s"].first()
    return per_run.groupby(level=RUN_KEYS).mean()


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
    sweep: pd.DataFrame | None = None,
    prune_sweep: pd.DataFrame | None = None,
) -> dict:
    """The headline numbers for summary.json, per run (init x method).

    `inits` holds the run's method (`meta.personalisation.method`; else the first method in
    the usual order) under each init, `baselines` every other method, by name (each says its
    init). Per run: users ok / failed, per-exit accuracy before and after (mean, median),
    shares helped / hurt, the early exits' mean gain, and the mean speedup at the drop
    tolerance. `methods`: the methods compared on the same users (`report.methods`), when there
    is more than one or a pruning method. Top level: user counts over all runs, the drop
    tolerance, times and the run's setup. A user counts as failed overall if it failed for at
    least one run.
    """
    from fedexits.report.methods import methods_comparison

    meta = dict(meta or {})
    exits = exit_table(per_user)
    by_threshold = threshold_table(thresholds).set_index(RUN_KEYS)
    ok_runs, failed_runs = _ok_and_failed_runs(per_user, failures)
    ok_count = ok_runs.groupby(RUN_KEYS)["user"].nunique()
    failed_count = failed_runs.groupby(RUN_KEYS)["user"].nunique()
    personalise_seconds = _mean_personalise_seconds(per_user)

    present = pd.concat(
        [exits[RUN_KEYS], by_threshold.index.to_frame(), ok_runs[RUN_KEYS], failed_runs[RUN_KEYS]]
    )
    runs = list(sort_by_init(present.astype(str).drop_duplicates()).itertuples(index=False, name=None))
    primary = (meta.get("personalisation") or {}).get("method")
    if primary is None:
        primary = ordered_methods(m for _, m in runs)[0] if runs else DEFAULT_METHOD
    per_init, baselines = {}, {}
    for init, method in runs:  # a handful of runs; all per-row work is done by the groupbys above
        key = (init, method)
        run_exits = exits[(exits["init"] == init) & (exits["method"] == method)]
        early = run_exits[~run_exits["is_final"].astype(bool)]
        chosen = by_threshold.loc[key] if key in by_threshold.index else pd.Series(dtype=float)
        record = {
            "init": init,
            "method": method,
            "users_ok": int(ok_count.get(key, 0)),
            "users_failed": int(failed_count.get(key, 0)),
            "final_exit": run_exits["exit"].max() if len(run_exits) else None,
            "early_exit_accuracy_before_mean": early["accuracy_before_mean"].mean(),
            "early_exit_accuracy_after_mean": early["accuracy_after_mean"].mean(),
            "early_exit_gain_pp_mean": early["gain_pp_mean"].mean(),
            "mean_threshold": chosen.get("threshold_mean", np.nan),
            "mean_accuracy_at_threshold": chosen.get("accuracy_mean", np.nan),
            "mean_final_accuracy": chosen.get("final_accuracy_mean", np.nan),
            "mean_expected_mflops": chosen.get("expected_mflops_mean", np.nan),
            "mean_speedup": chosen.get("speedup_mean", np.nan),
            "mean_latency_speedup": chosen.get("latency_speedup_mean", np.nan),
            "mean_personalise_s": personalise_seconds.get(key, np.nan),
            "exits": _records(run_exits.drop(columns=RUN_KEYS)),
            "thresholds": _threshold_record(chosen.drop(RUN_KEYS, errors="ignore")),
        }
        if method == primary:
            per_init[init] = record
        else:
            baselines[method if method not in baselines else f"{init}/{method}"] = record

    comparison = methods_comparison(per_user, thresholds, sweep, prune_sweep)
    if comparison is not None:
        comparison = {
            **{k: v for k, v in comparison.items() if k not in ("table", "levels", "user_list")},
            "table": _records(comparison["table"]),
            "levels": _records(comparison["levels"]),
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
            "method": primary,
            "inits": per_init,
            "baselines": baselines,
            "methods": comparison,
            "meta": meta,
        }
    )


def summary_runs(summary: dict) -> list[dict]:
    """Every run's record of a summary: the method under each init, then the baselines."""
    runs = []
    for init, record in (summary.get("inits") or {}).items():
        runs.append({"init": init, "method": summary.get("method") or DEFAULT_METHOD, **record})
    runs += list((summary.get("baselines") or {}).values())
    return runs
