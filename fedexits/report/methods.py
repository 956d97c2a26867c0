"""Methods compared on the same users: early exits, the fine-tuning baselines and structured
pruning, each at its operating point (the calibrated threshold, or the pruned network), with the
full network as the reference; and, per user, whether the exits beat a pruned network at equal
cost (the seed paper's data-aware vs data-agnostic pruning comes out of the same tables).

Pure pandas/matplotlib on the result tables (per_user, thresholds, sweep, prune_sweep).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import PercentFormatter

from fedexits.report.files import atomic_save_figure
from fedexits.report.plots import _figure
from fedexits.report.schema import (
    FAIL_SAFE_METHODS,
    STAGE_BEFORE,
    ordered_inits,
    ordered_methods,
    with_method,
)

METHODS_PNG = "methods.png"
FULL_NETWORK = "full network"  # the reference row: the shared model's final exit, no personalisation
EXITS = "exits"
WIN_TOLERANCE = 1e-9  # accuracies closer than this are a tie (no win)
EQUAL_COST_RULE = (
    "At equal cost, a user's exits are the user's exit curve over thresholds 0, 0.05, ..., 1 on "
    "its own test images (sweep.csv; MFLOPs and latency per sample grow with the threshold), "
    "interpolated linearly at the pruned network's MFLOPs (or latency); at one cost reached by "
    "several thresholds, the most accurate counts. The exits win when that accuracy is higher than "
    "the pruned network's. A user whose pruned network is cheaper than the exits' cheapest point "
    "(threshold 0) is not compared (out of range)."
)


def comparison_init(thresholds: pd.DataFrame) -> str | None:
    """The init under which most methods ran (the baselines run under the run's first init)."""
    if thresholds is None or thresholds.empty:
        return None
    frame = with_method(thresholds)
    counts = frame.groupby(frame["init"].astype(str))["method"].nunique()
    best = counts.max()
    return next(init for init in ordered_inits(counts.index) if counts[init] == best)


def compared_methods(thresholds: pd.DataFrame | None, prune_sweep: pd.DataFrame | None) -> list[str]:
    """The methods worth a comparison: several methods, or any pruning method."""
    if thresholds is None or thresholds.empty:
        return []
    methods = ordered_methods(with_method(thresholds)["method"])
    pruning = prune_sweep is not None and not prune_sweep.empty
    return methods if len(methods) > 1 or pruning else []


def exits_at_cost(curve: pd.DataFrame, cost_column: str, cost: float) -> float:
    """The user's exit curve at `cost` (see EQUAL_COST_RULE); NaN when out of range."""
    points = curve.dropna(subset=[cost_column, "accuracy"]).groupby(cost_column)["accuracy"].max()
    if points.empty or cost < points.index[0] - 1e-12 or np.isnan(cost):
        return float("nan")
    return float(np.interp(cost, points.index.to_numpy(float), points.to_numpy(float)))


def equal_cost(sweep: pd.DataFrame | None, points: pd.DataFrame, init: str) -> pd.DataFrame:
    """For each row of `points` (user, accuracy, mflops, latency_ms: a pruned network), the same
    user's exits at equal MFLOPs and at equal latency (columns exits_at_mflops,
    exits_at_latency; NaN: no exit curve or out of range)."""
    out = points.assign(exits_at_mflops=np.nan, exits_at_latency=np.nan)
    if sweep is None or sweep.empty:
        return out
    frame = with_method(sweep)
    curves = frame[(frame["init"].astype(str) == init) & (frame["method"] == EXITS)]
    by_user = {str(user): curve for user, curve in curves.groupby("user")}
    for index, row in points.iterrows():
        curve = by_user.get(str(row["user"]))
        if curve is None:
            continue
        out.loc[index, "exits_at_mflops"] = exits_at_cost(curve, "expected_mflops", row["mflops"])
        out.loc[index, "exits_at_latency"] = exits_at_cost(curve, "expected_latency_ms", row["latency_ms"])
    return out


def _win_stats(compared: pd.DataFrame) -> dict:
    """Share of users (in range) whose exits beat the pruned network at equal MFLOPs / latency,
    and the mean accuracy difference exits - pruned, in pp."""
    stats = {}
    for cost in ("mflops", "latency"):
        column = f"exits_at_{cost}"
        in_range = compared.dropna(subset=[column])
        difference = in_range[column] - in_range["accuracy"]
        stats[f"exits_win_share_{cost}"] = (
            float((difference > WIN_TOLERANCE).mean()) if len(in_range) else np.nan
        )
        stats[f"exits_minus_pp_{cost}"] = float(difference.mean() * 100) if len(in_range) else np.nan
        stats[f"out_of_range_{cost}"] = int(len(compared) - len(in_range))
    return stats


def _same_users(thresholds: pd.DataFrame, methods: list[str]) -> set[str]:
    users = [set(thresholds.loc[thresholds["method"] == m, "user"].astype(str)) for m in methods]
    return set.intersection(*users) if users else set()


def methods_comparison(
    per_user: pd.DataFrame,
    thresholds: pd.DataFrame,
    sweep: pd.DataFrame | None,
    prune_sweep: pd.DataFrame | None,
) -> dict | None:
    """{"init", "users", "rule", "table": one row per method (and the full network first),
    "levels": one row per pruning method x level} on the users every method served, or None
    when there is nothing to compare (one method, no pruning)."""
    methods = compared_methods(thresholds, prune_sweep)
    init = comparison_init(thresholds)
    if not methods or init is None:
        return None
    per_user, thresholds = with_method(per_user), with_method(thresholds)
    at_init = thresholds[thresholds["init"].astype(str) == init]
    methods = [m for m in methods if m in set(at_init["method"])]
    users = _same_users(at_init, methods)
    at_init = at_init[at_init["user"].astype(str).isin(users)]
    chosen = per_user[(per_user["init"].astype(str) == init) & per_user["user"].astype(str).isin(users)]
    before = chosen[chosen["stage"] == STAGE_BEFORE]
    full = before[before["exit"] == before["exit"].max()].drop_duplicates(["user"])
    full_mflops = float(full["mflops"].mean()) if len(full) else np.nan
    full_latency = float(full["latency_ms"].mean()) if len(full) else np.nan
    rows = [
        {
            "method": FULL_NETWORK,
            "users": len(full),
            "accuracy_mean": full["accuracy"].mean(),
            "mflops_mean": full_mflops,
            "latency_ms_mean": full_latency,
            "speedup_mean": 1.0,
            "latency_speedup_mean": 1.0,
            "personalise_s_mean": 0.0,
            "fail_safe": True,
        }
    ]
    seconds = chosen.groupby(["method", "user"])["personalise_s"].first() if len(chosen) else None
    pruning = set() if prune_sweep is None else set(with_method(prune_sweep)["method"])
    for method in methods:
        rows_m = at_init[at_init["method"] == method]
        row = {
            "method": method,
            "users": rows_m["user"].nunique(),
            "accuracy_mean": rows_m["accuracy"].mean(),
            "mflops_mean": rows_m["expected_mflops"].mean(),
            "latency_ms_mean": rows_m["expected_latency_ms"].mean(),
            "speedup_mean": rows_m["speedup"].mean(),
            "latency_speedup_mean": rows_m["latency_speedup"].mean(),
            "personalise_s_mean": seconds.loc[method].mean() if seconds is not None else np.nan,
            "peak_memory_mb_mean": rows_m["peak_memory_mb"].mean() if "peak_memory_mb" in rows_m else np.nan,
            "fail_safe": method in FAIL_SAFE_METHODS,
        }
        if method in pruning:
            points = rows_m.rename(columns={"expected_mflops": "mflops", "expected_latency_ms": "latency_ms"})
            row.update(
                _win_stats(equal_cost(sweep, points[["user", "accuracy", "mflops", "latency_ms"]], init))
            )
        rows.append(row)
    return {
        "init": init,
        "users": len(users),
        "user_list": sorted(users),
        "rule": EQUAL_COST_RULE,
        "table": pd.DataFrame(rows),
        "levels": pruning_levels(prune_sweep, sweep, init, users, full_mflops),
    }


def pruning_levels(prune_sweep, sweep, init: str, users: set[str], full_mflops: float) -> pd.DataFrame:
    """One row per pruning method x level: mean accuracy and cost of the users' pruned networks,
    the exits at equal cost, and (for prune_data) the gain over prune_agnostic per user, the seed
    paper's comparison."""
    if prune_sweep is None or prune_sweep.empty:
        return pd.DataFrame()
    frame = with_method(prune_sweep)
    frame = frame[(frame["init"].astype(str) == init) & frame["user"].astype(str).isin(users)]
    frame = equal_cost(sweep, frame.reset_index(drop=True), init)
    wide = frame.pivot_table(index=["user", "level"], columns="method", values="accuracy")
    rows = []
    for (method, level), group in frame.groupby(["method", "level"]):
        row = {
            "method": method,
            "level": level,
            "users": group["user"].nunique(),
            "accuracy_mean": group["accuracy"].mean(),
            "mflops_mean": group["mflops"].mean(),
            "latency_ms_mean": group["latency_ms"].mean(),
            "speedup_mean": (full_mflops / group["mflops"]).mean(),
            "personalise_s_mean": group["personalise_s"].mean(),
            "exits_at_mflops_mean": group["exits_at_mflops"].mean(),
            **_win_stats(group),
        }
        if method == "prune_data" and "prune_agnostic" in wide.columns:
            gain = (
                wide.xs(level, level="level")["prune_data"] - wide.xs(level, level="level")["prune_agnostic"]
            ) * 100
            gain = gain.dropna()
            row.update(
                gain_over_agnostic_pp_mean=gain.mean(),
                gain_over_agnostic_pp_median=gain.median(),
                gain_over_agnostic_pp_sd=gain.std(),
                gain_over_agnostic_pp_min=gain.min(),
                gain_over_agnostic_pp_max=gain.max(),
                share_data_aware_better=float((gain > WIN_TOLERANCE * 100).mean()) if len(gain) else np.nan,
            )
        rows.append(row)
    table = pd.DataFrame(rows)
    rank = {m: k for k, m in enumerate(ordered_methods(table["method"]))}
    return table.sort_values(["method", "level"], key=lambda c: c.map(rank) if c.name == "method" else c)


def plot_methods(comparison: dict, per_user, sweep, prune_sweep, path: Path) -> Path:
    """Mean accuracy against MFLOPs and against latency per sample, on the compared users: every
    threshold-based method's curve over thresholds (its calibrated point marked), every pruning
    method's curve over pruning levels (the user's level marked), and the full network."""
    init, users = comparison["init"], {str(u) for u in comparison.get("user_list", [])}
    table = comparison["table"]
    figure, axes_pair = _figure(2, panel_width=5.6, height=4.4, sharey=True)
    costs = (
        ("mflops", "expected_mflops", "MFLOPs per sample"),
        ("latency_ms", "expected_latency_ms", "ms per sample (batch 1)"),
    )
    colours = {m: f"C{k}" for k, m in enumerate(ordered_methods(table["method"][1:]))}

    def mine(frame):
        frame = with_method(frame)
        keep = frame["init"].astype(str) == init
        return frame[keep & (frame["user"].astype(str).isin(users) if users else keep)]

    curves = mine(sweep) if sweep is not None and not sweep.empty else pd.DataFrame()
    levels = mine(prune_sweep) if prune_sweep is not None and not prune_sweep.empty else pd.DataFrame()
    for axes, (short, long, label) in zip(axes_pair, costs):
        for method, colour in colours.items():
            row = table[table["method"] == method].iloc[0]
            if len(levels) and method in set(levels["method"]):
                line = levels[levels["method"] == method].groupby("level")[["accuracy", short]].mean()
                axes.plot(line[short], line["accuracy"], marker="s", color=colour, label=f"{method} (levels)")
                for level, point in line.iterrows():
                    axes.annotate(
                        f"{level:.0%}",
                        (point[short], point["accuracy"]),
                        textcoords="offset points",
                        xytext=(4, -10),
                        fontsize=7,
                        color=colour,
                    )
            elif len(curves) and method in set(curves["method"]):
                line = curves[curves["method"] == method].groupby("threshold")[["accuracy", long]].mean()
                axes.plot(
                    line[long], line["accuracy"], marker=".", color=colour, label=f"{method} (thresholds)"
                )
            axes.plot(
                row[f"{short}_mean"],
                row["accuracy_mean"],
                marker="o",
                markersize=9,
                color=colour,
                markeredgecolor="black",
                linestyle="none",
            )
        full = table[table["method"] == FULL_NETWORK].iloc[0]
        axes.plot(
            full[f"{short}_mean"],
            full["accuracy_mean"],
            marker="*",
            markersize=14,
            color="black",
            linestyle="none",
            label="full network (shared, fail-safe)",
        )
        axes.set_xlabel(label)
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
        axes.grid(alpha=0.3)
    axes_pair[0].set_ylabel("mean accuracy over users")
    handles, labels = axes_pair[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=3, frameon=False, fontsize=8)
    figure.suptitle(
        f"Methods on the same {comparison['users']} users (init {init}); circles: each method's "
        "operating point", fontsize=10,
    )  # fmt: skip
    return atomic_save_figure(figure, Path(path))
