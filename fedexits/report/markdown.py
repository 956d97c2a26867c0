"""report.md: a run's results as a document readable on its own (setup, headline, per-exit and
threshold tables, the figures, failures with their errors, times).

Tables are formatted here rather than with DataFrame.to_markdown, which needs the optional
`tabulate` package.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping

import pandas as pd

from fedexits.report.promise import promise_lines
from fedexits.report.schema import exit_label, ordered_methods

MISSING = "n/a"
_MAX_CELL = 120


def is_missing(value) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def percent(value) -> str:
    return MISSING if is_missing(value) else f"{100 * float(value):.1f}%"


def points(value) -> str:
    return MISSING if is_missing(value) else f"{float(value):+.2f}"


def number(value, digits: int = 2) -> str:
    return MISSING if is_missing(value) else f"{float(value):.{digits}f}"


def times_x(value) -> str:
    return MISSING if is_missing(value) else f"{float(value):.2f}x"


def count(value) -> str:
    if is_missing(value):
        return MISSING
    value = float(value)
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f}M"
    return f"{value / 1e3:.1f}k" if abs(value) >= 1e4 else f"{value:.0f}"


def cell(value) -> str:
    """Any value as one table cell: no pipes or newlines, bounded length."""
    if is_missing(value):
        return MISSING
    if isinstance(value, (dict, list, tuple)):
        value = json.dumps(value, default=str)
    text = str(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 3] + "..."


def markdown_table(
    frame: pd.DataFrame,
    columns: Mapping[str, str] | None = None,
    formats: Mapping[str, Callable] | None = None,
) -> str:
    """A GitHub-flavoured markdown table. `columns` maps column -> header (and picks and orders
    the columns); `formats` maps column -> function turning a value into text."""
    columns = dict(columns or {name: name for name in frame.columns})
    formats = formats or {}
    header = "| " + " | ".join(cell(title) for title in columns.values()) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule]
    for record in frame.to_dict("records"):
        texts = [cell(formats.get(name, cell)(record.get(name))) for name in columns]
        lines.append("| " + " | ".join(texts) + " |")
    if frame.empty:
        lines.append("| " + " | ".join("" for _ in columns) + " |")
    return "\n".join(lines)


def flatten(mapping: Mapping, prefix: str = "") -> dict:
    """Nested dicts as dotted keys, for a setting/value table."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _name_of(value) -> str:
    if isinstance(value, Mapping):
        return str(value.get("name") or value.get("backbone") or "") or MISSING
    return MISSING if is_missing(value) else str(value)


EXIT_COLUMNS = {
    "init": "init", "method": "method", "exit_name": "exit", "mflops": "MFLOPs", "params": "params",
    "latency_ms": "latency (ms)", "n_users": "users", "accuracy_before_mean": "before (mean)",
    "accuracy_before_median": "before (median)", "accuracy_after_mean": "after (mean)",
    "accuracy_after_median": "after (median)", "gain_pp_mean": "gain (pp)",
    "share_helped": "helped", "share_hurt": "hurt", "share_unchanged": "unchanged",
    "share_guard_fired": "guard fired",
}  # fmt: skip
EXIT_FORMATS = {
    "mflops": number, "params": count, "latency_ms": number, "n_users": count,
    "accuracy_before_mean": percent, "accuracy_before_median": percent,
    "accuracy_after_mean": percent, "accuracy_after_median": percent, "gain_pp_mean": points,
    "share_helped": percent, "share_hurt": percent, "share_unchanged": percent,
    "share_guard_fired": percent,
}  # fmt: skip
THRESHOLD_COLUMNS = {
    "init": "init", "method": "method", "n_users": "users", "threshold_mean": "threshold (mean)",
    "threshold_median": "threshold (median)", "accuracy_mean": "accuracy at threshold",
    "final_accuracy_mean": "final-exit accuracy", "accuracy_drop_pp_mean": "drop (pp)",
    "speedup_mean": "speedup (mean)", "speedup_median": "speedup (median)",
    "latency_speedup_mean": "latency speedup (mean)", "expected_mflops_mean": "MFLOPs/sample",
    "expected_latency_ms_mean": "ms/sample",
}  # fmt: skip
THRESHOLD_FORMATS = {
    "n_users": count, "threshold_mean": number, "threshold_median": number,
    "accuracy_mean": percent, "final_accuracy_mean": percent, "accuracy_drop_pp_mean": number,
    "speedup_mean": times_x, "speedup_median": times_x, "latency_speedup_mean": times_x,
    "expected_mflops_mean": number, "expected_latency_ms_mean": number,
}  # fmt: skip
HEADLINE_COLUMNS = {
    "init": "init", "method": "method", "users_ok": "users ok", "users_failed": "users failed",
    "early_exit_accuracy_before_mean": "early exits before", "early_exit_accuracy_after_mean":
    "early exits after", "early_exit_gain_pp_mean": "gain (pp)", "mean_threshold": "threshold",
    "mean_accuracy_at_threshold": "accuracy at threshold", "mean_final_accuracy":
    "final-exit accuracy", "mean_speedup": "speedup", "mean_latency_speedup": "latency speedup",
    "mean_personalise_s": "personalise (s/user)",
}  # fmt: skip
HEADLINE_FORMATS = {
    "early_exit_accuracy_before_mean": percent, "early_exit_accuracy_after_mean": percent,
    "early_exit_gain_pp_mean": points, "mean_threshold": number,
    "mean_accuracy_at_threshold": percent, "mean_final_accuracy": percent,
    "mean_speedup": times_x, "mean_latency_speedup": times_x, "mean_personalise_s": number,
}  # fmt: skip


def _headline_frame(summary: Mapping) -> pd.DataFrame:
    from fedexits.report.tables import summary_runs

    return pd.DataFrame(summary_runs(dict(summary)))


def _without_single_method(columns: Mapping[str, str], methods: list[str]) -> dict[str, str]:
    """A run with one method keeps its tables as they were: no method column."""
    return dict(columns) if len(methods) > 1 else {k: v for k, v in columns.items() if k != "method"}


def _latency_sentence(latency: Mapping | None) -> str:
    if not latency:
        return "Latency was not measured."
    full = latency.get("full_network_ms_per_sample") or {}
    sizes = ", ".join(f"{float(ms):.3f} ms at batch {batch}" for batch, ms in full.items())
    return (
        f"Latency (latency_ms, ms/sample) was measured with {latency.get('runtime')} on "
        f"{latency.get('threads')} thread(s), batch 1 (the full network: {sizes or MISSING}; "
        "every exit in latency.csv)."
    )


def _status_line(status: Mapping) -> str:
    if not status:
        return "Run status: n/a."
    if status.get("status") == "ok":
        return "Run status: **ok**."
    reason = cell(status.get("reason"))
    return f"Run status: **failed**: {reason}. The numbers below cover the users that finished."


def _failures_section(failures: pd.DataFrame | None, methods: list[str]) -> list[str]:
    if failures is None or failures.empty:
        return ["No user failed."]
    several = len(methods) > 1
    lines = [f"{len(failures)} user run(s) (user x init{' x method' if several else ''}) failed:", ""]
    for record in failures.to_dict("records"):
        error = cell(record.get("error")) if not is_missing(record.get("error")) else "(no error)"
        kind = record.get("kind")
        kind = "" if is_missing(kind) else f" ({kind})"
        method = f", method `{record.get('method')}`" if several else ""
        lines.append(f"- user `{record.get('user')}`, init `{record.get('init')}`{method}{kind}: {error}")
    return lines


def render_run_report(
    summary: Mapping,
    exits: pd.DataFrame,
    thresholds: pd.DataFrame,
    failures: pd.DataFrame | None,
    figures: Mapping[str, str],
    data_files: list[str],
    sections: list[str] = (),
    comparison: Mapping | None = None,
) -> str:
    """The text of report.md. `figures` maps a caption to a PNG path relative to the report;
    `exits` and `thresholds` are the outputs of exit_table and threshold_table; `sections` are
    further lines (e.g. the federated training) placed after the thresholds; `comparison` that of
    `report.methods.methods_comparison` (with the name of its figure), or None."""
    meta = dict(summary.get("meta") or {})
    tolerance = summary.get("drop_tolerance_pp")
    users = summary.get("users", {})
    status = meta.get("status") or {}
    skip = ("timings.", "status.", "global_training.epoch_loss", "federated_history", "budget")
    setup = {key: value for key, value in flatten(meta).items() if not key.startswith(skip)}
    exits = exits.assign(exit_name=[exit_label(e, f) for e, f in zip(exits["exit"], _final_exits(exits))])
    from fedexits.report.methods_markdown import PER_EXIT_METHODS_NOTE, methods_section

    methods = ordered_methods(set(thresholds.get("method", [])) | set(exits.get("method", [])))
    lines = [
        f"# fedexits run report: {_name_of(meta.get('dataset'))} / {_name_of(meta.get('model'))}",
        "",
        (
            "Early-exit personalisation (PersEPhonEE): every user personalises only the early exits "
            "of a shared multi-exit CNN (backbone and final classifier frozen). At inference a sample "
            "leaves at the first exit whose top-1 softmax beats the user's threshold, chosen so that "
            f"accuracy stays within {cell(tolerance)} percentage points of the final exit."
        ),
        "",
        (
            f"Users: {users.get('ok', 0)} ok, {users.get('failed', 0)} failed "
            f"(failed = failed for at least one init)."
        ),
        "",
        _status_line(status),
        "",
        (
            f"Each user's threshold was calibrated on {meta.get('calibration_split', MISSING)}. "
            + _latency_sentence(meta.get("latency"))
        ),
        "",
        *promise_lines(summary.get("calibration_promise")),
        "",
        "## Setup",
        "",
        markdown_table(pd.DataFrame({"setting": list(setup), "value": list(setup.values())})),
        "",
        "## Headline",
        "",
        (
            "Early-exit columns average over the early exits (not the final one); *before* is the "
            "user's accuracy with the shared exits, *after* with its personalised exits. Speedups are "
            "at each user's chosen threshold, relative to always running the final classifier."
        ),
        "",
        markdown_table(
            _headline_frame(summary), _without_single_method(HEADLINE_COLUMNS, methods), HEADLINE_FORMATS
        ),
        "",
        "## Per-exit accuracy",
        "",
        (
            "Helped / hurt / unchanged compare each user's personalised accuracy at an exit with the "
            "same user's accuracy before personalisation. Guard fired: share of users whose "
            "personalised exits were rejected on their validation split (global exits kept). The "
            "final exit is unchanged by construction."
            + (PER_EXIT_METHODS_NOTE if len(methods) > 1 or comparison else "")
        ),
        "",
        markdown_table(exits, _without_single_method(EXIT_COLUMNS, methods), EXIT_FORMATS),
        "",
        "## Thresholds",
        "",
        markdown_table(thresholds, _without_single_method(THRESHOLD_COLUMNS, methods), THRESHOLD_FORMATS),
        "",
        *sections,
        *(methods_section(comparison) if comparison else []),
        "## Figures",
        "",
    ]
    for caption, relative_path in figures.items():
        lines += [f"### {caption}", "", f"![{caption}]({relative_path})", ""]
    lines += ["## Failures", "", *_failures_section(failures, methods), "", "## Times", ""]
    times = summary.get("times") or {}
    time_rows = pd.DataFrame({"step": list(times), "seconds": list(times.values())})
    lines += [markdown_table(time_rows, formats={"seconds": lambda v: number(v, 1)}), ""]
    lines += ["## Files", "", *[f"- [`{name}`]({name})" for name in data_files], ""]
    return "\n".join(lines)


def _final_exits(exits: pd.DataFrame) -> pd.Series:
    if exits.empty:
        return pd.Series(dtype=int)
    keys = [key for key in ("init", "method") if key in exits.columns]
    return exits.groupby(keys)["exit"].transform("max")
