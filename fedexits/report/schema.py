"""Column names of the simulation's result tables, shared by the report and the collector.

The simulation produces these DataFrames; keeping the names in one place lets the report fail
with a clear message when a column is missing instead of a KeyError deep inside a groupby.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

PER_USER_COLUMNS = [
    "user", "init", "method", "stage", "exit", "accuracy", "mflops", "params", "latency_ms",
    "n_train", "n_test", "n_labelled", "guard_fired", "personalise_s",
]  # fmt: skip
THRESHOLD_COLUMNS = [
    "user", "init", "method", "threshold", "accuracy", "final_accuracy", "expected_mflops", "speedup",
    "expected_latency_ms", "latency_speedup",
]  # fmt: skip
SWEEP_COLUMNS = ["user", "init", "method", "threshold", "accuracy", "expected_mflops", "expected_latency_ms"]
FAILURE_COLUMNS = ["user", "init", "method", "kind", "error"]
# Pruning methods: one row per user and pruning level (the user's accuracy/cost curve).
PRUNE_SWEEP_COLUMNS = [
    "user", "init", "method", "level", "flops_removed", "channel_ratio", "accuracy", "mflops",
    "params", "latency_ms", "personalise_s",
]  # fmt: skip
# Columns that measure time, not results: two runs with the same seed differ only in these.
TIMING_COLUMNS = ("latency_ms", "personalise_s", "expected_latency_ms", "latency_speedup", "peak_memory_mb")

# Columns the tables and plots cannot do without (the others are reported when present).
REQUIRED_PER_USER = ["user", "init", "stage", "exit", "accuracy", "mflops", "params"]
REQUIRED_THRESHOLDS = ["user", "init", "threshold", "accuracy", "final_accuracy", "speedup"]
REQUIRED_SWEEP = ["user", "init", "threshold", "accuracy", "expected_latency_ms"]
REQUIRED_PRUNE_SWEEP = ["user", "init", "method", "level", "accuracy", "mflops", "latency_ms"]

STAGE_BEFORE = "global"
STAGE_AFTER = "personalised"
INIT_ORDER = ["global", "federated", "scratch"]
DEFAULT_METHOD = "exits"  # results written before methods were recorded are the exits'
METHOD_ORDER = ["exits", "final", "full", "none", "prune_data", "prune_agnostic"]
# Methods that leave the shared final classifier as it is: the final exit stays the fail-safe.
FAIL_SAFE_METHODS = ("exits", "none")


def with_schema(frame: pd.DataFrame | None, columns: list[str]) -> pd.DataFrame:
    """A frame to write as CSV: None or a column-less frame becomes an empty frame with the
    schema's header; otherwise the schema's columns come first and extra columns are kept."""
    if frame is None or len(frame.columns) == 0:
        return pd.DataFrame({column: pd.Series(dtype=object) for column in columns})
    known = [column for column in columns if column in frame.columns]
    extra = [column for column in frame.columns if column not in columns]
    return frame[known + extra]


def require_columns(frame: pd.DataFrame, required: list[str], name: str) -> None:
    """Raise ValueError naming every missing column (an empty frame with no columns is fine)."""
    if len(frame.columns) == 0:
        return
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise ValueError(f"{name} is missing column(s) {missing}; has {list(frame.columns)}")


def with_method(frame: pd.DataFrame | None) -> pd.DataFrame | None:
    """A result frame with a `method` column (results from before methods were recorded are the
    exits method's), as text."""
    if frame is None or len(frame.columns) == 0:
        return frame
    if "method" not in frame.columns:
        position = list(frame.columns).index("init") + 1 if "init" in frame.columns else 0
        frame = frame.copy()
        frame.insert(position, "method", DEFAULT_METHOD)
    return frame.assign(method=frame["method"].astype(str))


def ordered_methods(methods: Iterable[str]) -> list[str]:
    """exits, final, full, none, prune_data, prune_agnostic, then anything else alphabetically."""
    present = {str(method) for method in methods}
    known = [method for method in METHOD_ORDER if method in present]
    return known + sorted(present - set(known))


def ordered_inits(inits: Iterable[str]) -> list[str]:
    """global, federated, scratch first (the paper's order), then anything else alphabetically."""
    present = {str(init) for init in inits}
    known = [init for init in INIT_ORDER if init in present]
    return known + sorted(present - set(known))


def exit_label(exit_index: int, final_exit: int) -> str:
    return "final" if int(exit_index) == int(final_exit) else f"exit {int(exit_index)}"
