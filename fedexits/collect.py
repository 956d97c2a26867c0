"""Gather a Hydra multirun sweep into one table, a markdown summary and a plot.

    python -m fedexits.collect SWEEP_DIR [--out DIR]

SWEEP_DIR holds one numbered directory per job (0/, 1/, ...), each with `.hydra/overrides.yaml`
and the run's outputs. A job is ok when its summary.json exists (the report writes it last) and
says the run succeeded. It failed when it has no summary (with the one-line error from its
error.txt when there is one) or when its summary says the run failed (too many users failed, or a
bug): such a job keeps its rows, marked failed with the reason. Failed jobs are rows of the
table too, so a sweep with a rejected setting still shows what was tried. A lifecycle job
(`+experiment=lifecycle`) gives one row per policy with its target metrics instead of rows per
exit, and the report gains a lifecycle table and figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

from fedexits.errors import EXIT_BAD_INPUT
from fedexits.report.files import atomic_write_csv, atomic_write_text
from fedexits.report.lifecycle_sweep import (
    LIFECYCLE_FIELDS,
    LIFECYCLE_SWEEP_PNG,
    is_lifecycle,
    lifecycle_markdown,
    lifecycle_rows,
    plot_lifecycle_sweep,
)
from fedexits.report.markdown import (
    cell,
    count,
    is_missing,
    markdown_table,
    number,
    percent,
    points,
    times_x,
)
from fedexits.report.plots import SWEEP_PNG, plot_sweep_accuracy
from fedexits.report.run import SUMMARY_JSON
from fedexits.report.schema import ordered_inits, ordered_methods
from fedexits.report.tables import summary_runs

ERROR_TXT = "error.txt"
OVERRIDES_YAML = Path(".hydra") / "overrides.yaml"
SWEEP_CSV = "sweep.csv"
SWEEP_MD = "sweep.md"
OVERRIDE_PREFIX = "override."  # override columns can't clash with result columns such as "init"

INIT_FIELDS = [
    "users_ok", "users_failed", "early_exit_gain_pp_mean", "mean_threshold",
    "mean_accuracy_at_threshold", "mean_final_accuracy", "mean_expected_mflops", "mean_speedup",
    "mean_latency_speedup", "mean_personalise_s",
]  # fmt: skip
EXIT_FIELDS = [
    "exit", "is_final", "accuracy_before_mean", "accuracy_before_median", "accuracy_after_mean",
    "accuracy_after_median", "gain_pp_mean", "share_helped", "share_hurt", "mflops", "params",
]  # fmt: skip


class SweepError(Exception):
    """The sweep directory cannot be collected; the message is one line for the user."""


def find_jobs(sweep_dir: Path) -> list[Path]:
    """The numbered job directories of a multirun, in job order (2 before 10)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepError(f"sweep directory {sweep_dir} does not exist or is not a directory")
    jobs = [path for path in sweep_dir.iterdir() if path.is_dir() and path.name.isdigit()]
    if not jobs:
        raise SweepError(f"no job directories (0/, 1/, ...) in {sweep_dir}; is it a Hydra multirun?")
    return sorted(jobs, key=lambda path: int(path.name))


def read_overrides(job_dir: Path) -> list[str]:
    """The job's command-line overrides ("key=value" strings); [] when Hydra left none."""
    path = Path(job_dir) / OVERRIDES_YAML
    if not path.is_file():
        return []
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return []
    return [str(item) for item in loaded] if isinstance(loaded, list) else []


def override_columns(overrides: list[str]) -> dict[str, str]:
    """{"override.personalisation.alpha": "0", ...}; "+key"/"++key"/"~key" are keyed by "key"."""
    columns = {}
    for override in overrides:
        key, _, value = override.partition("=")
        columns[OVERRIDE_PREFIX + key.lstrip("+~").strip()] = value.strip()
    return columns


def _first_line(path: Path) -> str | None:
    if not path.is_file():
        return None
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    return next((line for line in lines if line), "(empty error.txt)")


def _read_summary(job_dir: Path) -> tuple[dict | None, str | None]:
    """(summary, None) for a finished job, (None, one-line error) otherwise."""
    summary_path = job_dir / SUMMARY_JSON
    if not summary_path.is_file():
        error = _first_line(job_dir / ERROR_TXT)
        return None, error or f"no {SUMMARY_JSON} and no {ERROR_TXT}: the job did not finish"
    try:
        return json.loads(summary_path.read_text(encoding="utf-8")), None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, f"unreadable {SUMMARY_JSON}: {error}"


def job_rows(job_dir: Path) -> list[dict]:
    """One row per run (init x method) x exit of a finished job, or a single "failed" row with
    the error."""
    job_dir = Path(job_dir)
    overrides = read_overrides(job_dir)
    base = {
        "job": int(job_dir.name),
        "status": "ok",
        **override_columns(overrides),
        "label": f"{job_dir.name}: " + (", ".join(overrides) or "(no overrides)"),
        "error": None,
        "job_dir": str(job_dir),
    }
    summary, error = _read_summary(job_dir)
    if summary is None:
        return [{**base, "status": "failed", "error": error}]
    status = (summary.get("meta") or {}).get("status") or {}
    if status.get("status") == "failed":
        base.update(status="failed", error=f"run failed: {status.get('reason')}")
    if is_lifecycle(summary):
        return lifecycle_rows(summary, base) or [base]
    rows = []
    for run in summary_runs(summary):
        run_values = {"init": run["init"], "method": run["method"]}
        run_values.update({field: run.get(field) for field in INIT_FIELDS})
        exits = run.get("exits") or [{}]
        rows += [{**base, **run_values, **{f: record.get(f) for f in EXIT_FIELDS}} for record in exits]
    return rows or [base]


def collect_sweep(sweep_dir: str | Path) -> pd.DataFrame:
    """The sweep as one table: one row per job x init x exit (failed jobs: one row each)."""
    rows = [row for job_dir in find_jobs(Path(sweep_dir)) for row in job_rows(job_dir)]
    table = pd.DataFrame(rows)
    overrides = sorted(c for c in table.columns if c.startswith(OVERRIDE_PREFIX))
    first = ["job", "status", *overrides, "init", "method", *EXIT_FIELDS, *INIT_FIELDS]
    first += [f for f in LIFECYCLE_FIELDS if f in table.columns]  # lifecycle jobs only
    table = table.reindex(columns=first + ["label", "error", "job_dir"])
    integers = ["job", "exit", "users_ok", "users_failed"]
    return table.astype({column: "Int64" for column in integers})


def _exit_name(record) -> str:
    return "final" if bool(record["is_final"]) else f"exit {int(record['exit'])}"


def _accuracy_by_exit(ok_rows: pd.DataFrame) -> pd.DataFrame:
    """Rows job x init x method, columns "exit 0".. "final": mean personalised accuracy (text)."""
    rows = ok_rows.dropna(subset=["exit"])
    if rows.empty:
        return pd.DataFrame(columns=["label", "init", "method"])
    rows = rows.assign(exit_name=rows.apply(_exit_name, axis=1))
    wide = rows.pivot_table(
        index=["job", "label", "init", "method"],
        columns="exit_name",
        values="accuracy_after_mean",
        aggfunc="first",
    )
    early = sorted((c for c in wide.columns if c != "final"), key=lambda c: int(c.split()[1]))
    wide = wide[early + (["final"] if "final" in wide.columns else [])].apply(
        lambda column: column.map(percent)
    )
    return wide.reset_index()


def render_sweep_report(table: pd.DataFrame, sweep_dir: Path, figure_name: str) -> str:
    """The text of sweep.md: jobs and their status, accuracy per exit, headline per job x init."""
    jobs = table.drop_duplicates("job")
    failed = jobs[jobs["status"] == "failed"]
    ok_rows = table[table["status"] == "ok"]
    init_rank = {init: rank for rank, init in enumerate(ordered_inits(ok_rows["init"].dropna()))}
    methods = ordered_methods(ok_rows["method"].dropna())
    method_rank = {method: rank for rank, method in enumerate(methods)}
    headline = ok_rows.drop_duplicates(["job", "init", "method"]).dropna(subset=["init"])
    headline = headline.assign(_rank=headline["init"].map(init_rank), _m=headline["method"].map(method_rank))
    headline = headline.sort_values(["job", "_rank", "_m"])
    by_exit = _accuracy_by_exit(ok_rows)
    method_column = {"method": "method"} if len(methods) > 1 else {}
    lines = [
        f"# Sweep: {cell(str(sweep_dir))}",
        "",
        (
            f"{len(jobs)} jobs: {len(jobs) - len(failed)} ok, {len(failed)} failed. "
            f"Full table: [`{SWEEP_CSV}`]({SWEEP_CSV})."
        ),
        "",
        "## Jobs",
        "",
        markdown_table(
            jobs,
            {"job": "job", "status": "status", "label": "overrides", "error": "error"},
            {
                "label": lambda label: label.split(": ", 1)[-1],
                "error": lambda e: "" if is_missing(e) else e,
            },
        ),
        "",
    ]
    lifecycle_only = "policy" in ok_rows and ok_rows["policy"].notna().any() and ok_rows["init"].isna().all()
    if not lifecycle_only:
        lines += one_shot_sections(by_exit, headline, method_column, figure_name)
    lines += [
        *lifecycle_markdown(table),
        "## Failed jobs",
        "",
    ]
    lines += [
        f"- job {row['job']} ({cell(row['label'].split(': ', 1)[-1])}): {cell(row['error'])}"
        for row in failed.to_dict("records")
    ] or ["No job failed."]
    return "\n".join(lines) + "\n"


def one_shot_sections(by_exit, headline, method_column: dict, figure_name: str) -> list[str]:
    """sweep.md's one-shot sections: accuracy per exit, the headline per job and init, the figure."""
    return [
        "## Mean personalised accuracy per exit",
        "",
        markdown_table(
            by_exit,
            {
                "label": "job",
                "init": "init",
                **method_column,
                **{c: c for c in by_exit.columns if c not in ("job", "label", "init", "method")},
            },
        ),
        "",
        "## Headline per job and init",
        "",
        (
            "Gain: mean over the early exits of the personalised minus non-personalised accuracy. "
            "Speedups at each user's chosen threshold (a pruning method: its pruned network), "
            "relative to the full network."
        ),
        "",
        markdown_table(
            headline,
            {
                "label": "job",
                "init": "init",
                **method_column,
                "users_ok": "users ok",
                "users_failed": "users failed",
                "early_exit_gain_pp_mean": "gain (pp)",
                "mean_accuracy_at_threshold": "accuracy at threshold",
                "mean_final_accuracy": "final-exit accuracy",
                "mean_expected_mflops": "MFLOPs/sample",
                "mean_speedup": "speedup",
                "mean_latency_speedup": "latency speedup",
                "mean_personalise_s": "personalise (s/user)",
            },
            {
                "users_ok": count,
                "users_failed": count,
                "early_exit_gain_pp_mean": points,
                "mean_accuracy_at_threshold": percent,
                "mean_final_accuracy": percent,
                "mean_expected_mflops": number,
                "mean_speedup": times_x,
                "mean_latency_speedup": times_x,
                "mean_personalise_s": number,
            },
        ),
        "",
        "## Figure",
        "",
        f"![Mean personalised accuracy per exit, one line per job]({figure_name})",
        "",
    ]


def write_sweep_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> pd.DataFrame:
    """Collect `sweep_dir` and write sweep.csv, sweep.md and the plot into `out_dir` (default:
    the sweep directory itself). Returns the table."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    table = collect_sweep(sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(table, out_dir / SWEEP_CSV)
    figure = plot_sweep_accuracy(table[table["status"] == "ok"], out_dir / SWEEP_PNG)
    plot_lifecycle_sweep(table, out_dir / LIFECYCLE_SWEEP_PNG)
    atomic_write_text(out_dir / SWEEP_MD, render_sweep_report(table, sweep_dir, figure.name))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedexits.collect",
        description="Gather a Hydra multirun sweep of fedexits.simulate into one table and plot.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the multirun directory (holds 0/, 1/, ...)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: SWEEP_DIR)")
    args = parser.parse_args(argv)
    try:
        table = write_sweep_report(args.sweep_dir, args.out)
    except SweepError as error:
        print(f"fedexits.collect: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:
        print(f"fedexits.collect: error: cannot write the sweep report: {error}", file=sys.stderr)
        return 1
    jobs = table.drop_duplicates("job")
    n_failed = int((jobs["status"] == "failed").sum())
    out_dir = args.out or args.sweep_dir
    print(
        f"collected {len(jobs)} jobs ({len(jobs) - n_failed} ok, {n_failed} failed) -> "
        f"{out_dir / SWEEP_CSV}, {out_dir / SWEEP_MD}, {out_dir / SWEEP_PNG}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
