"""The few numbers a run prints when it ends (the full report is in report.md)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_summary(summary: dict, out_dir: str | Path) -> None:
    console = Console()
    for init, s in (summary.get("inits") or {}).items():
        table = Table(
            title=f"init={init}: {s.get('users_ok', 0)} users ok, {s.get('users_failed', 0)} failed"
        )
        for column in ("exit", "before", "after", "helped", "hurt", "MFLOPs"):
            table.add_column(column, justify="right")
        for row in s.get("exits", []):
            table.add_row(
                "final" if row.get("is_final") else str(row["exit"]),
                _pct(row.get("accuracy_before_mean")),
                _pct(row.get("accuracy_after_mean")),
                _pct(row.get("share_helped")),
                _pct(row.get("share_hurt")),
                "-" if row.get("mflops") is None else f"{row['mflops']:.1f}",
            )
        console.print(table)
        speedup = s.get("mean_speedup")
        if speedup is not None:
            console.print(f"mean speedup at the drop tolerance: {speedup:.2f}x (FLOPs)")
    console.print(f"report: {Path(out_dir) / 'report.md'}")


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
