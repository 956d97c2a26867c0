"""The few numbers a run prints when it ends (the full report is in report.md)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedexits.report.tables import summary_runs


def print_summary(summary: dict, out_dir: str | Path) -> None:
    console = Console()
    runs = summary_runs(summary)
    several = len({run["method"] for run in runs}) > 1
    pruned = summary.get("methods") or {}
    for run in runs:
        method = f" method={run['method']}" if several else ""
        title = (
            f"init={run['init']}{method}: {run.get('users_ok', 0)} users ok, "
            f"{run.get('users_failed', 0)} failed"
        )
        if run["method"].startswith("prune_"):  # one network, no exits
            accuracy, mflops = run.get("mean_accuracy_at_threshold"), run.get("mean_expected_mflops")
            console.print(
                f"{title}: pruned network {_pct(accuracy)} at "
                f"{'-' if mflops is None else f'{mflops:.1f}'} MFLOPs "
                f"({_times(run.get('mean_speedup'))} fewer), fail-safe given up"
            )
            continue
        table = Table(title=title)
        for column in ("exit", "before", "after", "helped", "hurt", "MFLOPs"):
            table.add_column(column, justify="right")
        for row in run.get("exits", []):
            table.add_row(
                "final" if row.get("is_final") else str(row["exit"]),
                _pct(row.get("accuracy_before_mean")),
                _pct(row.get("accuracy_after_mean")),
                _pct(row.get("share_helped")),
                _pct(row.get("share_hurt")),
                "-" if row.get("mflops") is None else f"{row['mflops']:.1f}",
            )
        console.print(table)
        speedup = run.get("mean_speedup")
        if speedup is not None:
            console.print(f"mean speedup at the drop tolerance: {speedup:.2f}x (FLOPs)")
    if pruned.get("table"):
        table = Table(title=f"methods on the same {pruned.get('users')} users (init={pruned.get('init')})")
        for column in ("method", "accuracy", "MFLOPs", "speedup", "s/user", "fail-safe", "exits win"):
            table.add_column(column, justify="right")
        for row in pruned["table"]:
            table.add_row(
                row["method"],
                _pct(row.get("accuracy_mean")),
                "-" if row.get("mflops_mean") is None else f"{row['mflops_mean']:.1f}",
                _times(row.get("speedup_mean")),
                "-" if row.get("personalise_s_mean") is None else f"{row['personalise_s_mean']:.2f}",
                "yes" if row.get("fail_safe") else "no",
                _pct(row.get("exits_win_share_mflops")),
            )
        console.print(table)
    console.print(f"report: {Path(out_dir) / 'report.md'}")


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _times(value) -> str:
    return "-" if value is None else f"{value:.2f}x"
