"""Lifecycle jobs in a collected sweep (`python -m fedexits.collect`): one row per job and policy
with the issue's target metrics, a markdown table and a figure (drifted users' gap to the final
exit and cost, per job and policy)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .files import atomic_save_figure
from .markdown import markdown_table, number, percent, points
from .plots import _figure, _no_data

LIFECYCLE_FIELDS = [
    "policy", "drifted_users", "drifted_accuracy", "drifted_final_accuracy", "drifted_gap_pp_mean",
    "drifted_within_2pp", "drifted_flops_share", "median_delay_days", "drifted_flagged",
    "steady_users", "steady_accuracy", "steady_final_accuracy", "steady_flops_share",
    "steady_train_gflops_per_user", "steady_false_alarm_users", "train_gflops_per_user", "accuracy",
]  # fmt: skip
LIFECYCLE_SWEEP_PNG = "sweep_lifecycle.png"


def is_lifecycle(summary: dict) -> bool:
    return (summary.get("meta") or {}).get("mode") == "lifecycle"


def lifecycle_rows(summary: dict, base: dict) -> list[dict]:
    """One row per policy of a lifecycle job's summary (its `policies` records)."""
    records = summary.get("policies", [])
    return [{**base, **{f: record.get(f) for f in LIFECYCLE_FIELDS}} for record in records]


def lifecycle_markdown(table: pd.DataFrame) -> list[str]:
    """The sweep report's lifecycle section (empty when no job is a lifecycle run)."""
    if "policy" not in table or table["policy"].dropna().empty:
        return []
    rows = table[(table["status"] == "ok") & table["policy"].notna()]
    rows = rows.assign(varying=rows["job"].map(varying_overrides(table)))
    columns = {
        "varying": "job (overrides that differ)",
        "policy": "policy",
        "drifted_gap_pp_mean": "drifted: gap to final (pp)",
        "drifted_within_2pp": "drifted: within 2 pp",
        "drifted_flops_share": "drifted: FLOPs share",
        "median_delay_days": "median delay (days; n/a: most never flagged)",
        "drifted_flagged": "drifted: flagged",
        "steady_accuracy": "no-drift acc.",
        "steady_train_gflops_per_user": "no-drift train GFLOPs/user",
        "steady_false_alarm_users": "false alarms",
    }
    formats = {
        "drifted_gap_pp_mean": points,
        "median_delay_days": number,
        "drifted_flagged": percent,
        "steady_train_gflops_per_user": number,
        **{k: percent for k in ("drifted_within_2pp", "drifted_flops_share", "steady_accuracy")},
        "steady_false_alarm_users": percent,
    }
    return [
        "## Lifecycle per job and policy",
        "",
        "Drifted users from their drift day on, users without drift over the whole run "
        "(lifecycle_targets.csv of each job).",
        "",
        markdown_table(rows, {k: v for k, v in columns.items() if k in rows}, formats),
        "",
        f"![drifted users' gap to the final exit and cost, per job]({LIFECYCLE_SWEEP_PNG})",
        "",
    ]


def varying_overrides(table: pd.DataFrame) -> dict:
    """job -> "job: key=value, ..." over the override columns whose values differ between jobs
    (the common ones would hide what the sweep varies)."""
    jobs = table.drop_duplicates("job").set_index("job")
    overrides = [c for c in jobs.columns if c.startswith("override.")]
    varying = [c for c in overrides if jobs[c].astype(str).nunique() > 1]
    return {
        job: f"{job}: "
        + (", ".join(f"{c[len('override.') :]}={row[c]}" for c in varying) or "(same overrides)")
        for job, row in jobs.iterrows()
    }


def plot_lifecycle_sweep(table: pd.DataFrame, path: Path) -> Path:
    """Per policy, one line over the jobs: drifted users' mean gap to the final exit and their
    FLOPs share of the full network."""
    rows = table.dropna(subset=["policy"]) if "policy" in table else table.iloc[:0]
    rows = rows[rows["status"] == "ok"] if len(rows) else rows
    if rows.empty:
        return _no_data(path, "lifecycle sweep")
    figure, axes = _figure(2, panel_width=5.5)
    jobs = sorted(rows["job"].unique())
    for i, (policy, group) in enumerate(rows.groupby("policy", sort=False)):
        group = group.set_index("job").reindex(jobs)
        axes[0].plot(jobs, group["drifted_gap_pp_mean"], marker="o", color=f"C{i}", label=policy)
        axes[1].plot(jobs, 100 * group["drifted_flops_share"], marker="o", color=f"C{i}")
    axes[0].set_ylabel("drifted users: gap to the final exit (pp)")
    axes[1].set_ylabel("drifted users: FLOPs share of the full network (%)")
    for ax in axes:
        ax.set_xlabel("job")
        ax.set_xticks(jobs)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return atomic_save_figure(figure, path)
