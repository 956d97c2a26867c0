"""Write a run's complete report into its directory, and read it back.

Order matters: the raw CSVs go first (the data survives if a later step fails), summary.json goes
last, so its presence means the whole report was written. The sweep collector relies on that.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from fedexits.report.federated import (
    FEDERATED_CSV,
    FEDERATED_PNG,
    budget_section,
    federated_section,
    plot_federated_curve,
)
from fedexits.report.files import atomic_write_csv, atomic_write_json, atomic_write_text, to_jsonable
from fedexits.report.markdown import render_run_report
from fedexits.report.methods import METHODS_PNG, methods_comparison, plot_methods
from fedexits.report.plots import (
    CDF_PNG,
    COST_PNG,
    LATENCY_PNG,
    plot_accuracy_cdf,
    plot_accuracy_vs_cost,
    plot_accuracy_vs_latency,
)
from fedexits.report.schema import (
    FAILURE_COLUMNS,
    PER_USER_COLUMNS,
    PRUNE_SWEEP_COLUMNS,
    REQUIRED_PER_USER,
    REQUIRED_PRUNE_SWEEP,
    REQUIRED_SWEEP,
    REQUIRED_THRESHOLDS,
    SWEEP_COLUMNS,
    THRESHOLD_COLUMNS,
    require_columns,
    with_method,
    with_schema,
)
from fedexits.report.tables import exit_table, summarise, threshold_table

PER_USER_CSV = "per_user.csv"
THRESHOLDS_CSV = "thresholds.csv"
SWEEP_CSV = "sweep.csv"
FAILURES_CSV = "failures.csv"
PRUNE_SWEEP_CSV = "prune_sweep.csv"
SUMMARY_JSON = "summary.json"
COST_TABLE_CSV = "cost_table.csv"
LATENCY_CSV = "latency.csv"
REPORT_MD = "report.md"

_CSV_FILES = {
    "per_user": (PER_USER_CSV, PER_USER_COLUMNS),
    "thresholds": (THRESHOLDS_CSV, THRESHOLD_COLUMNS),
    "sweep": (SWEEP_CSV, SWEEP_COLUMNS),
    "failures": (FAILURES_CSV, FAILURE_COLUMNS),
}
# Read back as text exactly as written: a user called "NA" or "007" stays that string.
_TEXT_COLUMNS = {"user": str, "init": str, "method": str, "stage": str, "error": str}


def write_run_report(
    run_dir: str | Path,
    per_user: pd.DataFrame,
    thresholds: pd.DataFrame,
    sweep: pd.DataFrame,
    failures: pd.DataFrame | None,
    meta: dict | None,
    cost_table: pd.DataFrame | None = None,
    federated: pd.DataFrame | None = None,
    budget: pd.DataFrame | None = None,
    latency_table: pd.DataFrame | None = None,
    prune_sweep: pd.DataFrame | None = None,
) -> dict:
    """Write per_user.csv, thresholds.csv, sweep.csv, failures.csv (header even when empty),
    cost_table.csv, latency.csv, federated.csv and prune_sweep.csv (when given; `federated`: one row
    per round, see `fedexits.study.budget`), the figures, report.md and summary.json into `run_dir`;
    return the summary dict. `budget` (per init: samples and FLOPs that trained the exits) goes
    into the report and summary.json.

    Raises ValueError naming the missing columns if a table lacks a required column (after the
    CSVs are written, so the raw results are kept).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    given = {"per_user": per_user, "thresholds": thresholds, "sweep": sweep, "failures": failures}
    frames = {
        name: with_schema(with_method(given[name]), columns) for name, (_, columns) in _CSV_FILES.items()
    }
    for name, (file_name, _) in _CSV_FILES.items():
        atomic_write_csv(frames[name], run_dir / file_name)
    if prune_sweep is not None:
        prune_sweep = with_schema(prune_sweep, PRUNE_SWEEP_COLUMNS)
    extra_files = {
        COST_TABLE_CSV: cost_table,
        LATENCY_CSV: latency_table,
        FEDERATED_CSV: federated,
        PRUNE_SWEEP_CSV: prune_sweep,
    }
    for file_name, table in extra_files.items():
        if table is not None:
            atomic_write_csv(table, run_dir / file_name)

    per_user, thresholds, sweep = frames["per_user"], frames["thresholds"], frames["sweep"]
    require_columns(per_user, REQUIRED_PER_USER, "per_user")
    require_columns(thresholds, REQUIRED_THRESHOLDS, "thresholds")
    require_columns(sweep, REQUIRED_SWEEP, "sweep")
    if prune_sweep is not None:
        require_columns(prune_sweep, REQUIRED_PRUNE_SWEEP, "prune_sweep")
    summary = summarise(per_user, thresholds, frames["failures"], meta, sweep, prune_sweep)
    if budget is not None:
        summary["budget"] = to_jsonable(budget.to_dict("records"))

    figures = {
        "Per-user accuracy CDF per exit, before and after personalisation (Fig. 3b)": plot_accuracy_cdf(
            per_user, run_dir / CDF_PNG
        ).name,
        "Mean accuracy vs MFLOPs and parameters per exit (Fig. 5)": plot_accuracy_vs_cost(
            per_user, run_dir / COST_PNG
        ).name,
        "Mean accuracy vs mean latency over exit thresholds (Fig. 7)": plot_accuracy_vs_latency(
            sweep, per_user, run_dir / LATENCY_PNG, prune_sweep
        ).name,
    }
    meta = meta or {}
    history = meta.get("federated_history")
    federated_figure = None
    if federated is not None:
        central = next((r for r in summary.get("budget", []) if r["init"] == "global"), None)
        reference = (history or {}).get("reference")
        federated_figure = plot_federated_curve(federated, reference, central, run_dir / FEDERATED_PNG).name
    sections = budget_section(budget) + federated_section(history, federated, federated_figure)
    comparison = methods_comparison(per_user, thresholds, sweep, prune_sweep)
    if comparison is not None:
        comparison["figure"] = plot_methods(
            comparison, per_user, sweep, prune_sweep, run_dir / METHODS_PNG
        ).name
    report = render_run_report(
        summary,
        exit_table(per_user),
        threshold_table(thresholds),
        frames["failures"],
        figures,
        comparison=comparison,
        data_files=[file_name for file_name, _ in _CSV_FILES.values()]
        + [name for name, table in extra_files.items() if table is not None]
        + [SUMMARY_JSON],
        sections=sections,
    )
    atomic_write_text(run_dir / REPORT_MD, report)
    atomic_write_json(summary, run_dir / SUMMARY_JSON)
    return summary


def read_result_csv(path: str | Path) -> pd.DataFrame:
    """A result CSV as written by write_run_report: text columns stay text, only empty cells are
    missing, guard_fired becomes a nullable boolean."""
    frame = pd.read_csv(path, dtype=_TEXT_COLUMNS, keep_default_na=False, na_values=[""])
    if "guard_fired" in frame.columns:
        frame["guard_fired"] = frame["guard_fired"].astype("boolean")
    return frame


def load_run(run_dir: str | Path) -> dict:
    """Read a run directory back: {"per_user", "thresholds", "sweep", "failures": DataFrame,
    "prune_sweep": DataFrame or None (no pruning method ran), "summary": dict}. Raises
    FileNotFoundError naming the first missing file."""
    run_dir = Path(run_dir)
    loaded = {name: read_result_csv(run_dir / file_name) for name, (file_name, _) in _CSV_FILES.items()}
    prune_sweep = run_dir / PRUNE_SWEEP_CSV
    loaded["prune_sweep"] = read_result_csv(prune_sweep) if prune_sweep.is_file() else None
    loaded["summary"] = json.loads((run_dir / SUMMARY_JSON).read_text(encoding="utf-8"))
    return loaded
