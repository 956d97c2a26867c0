"""The report's figures (PNG): the paper's Fig. 3b (per-user accuracy CDFs), Fig. 5 (accuracy vs
cost per exit) and Fig. 7 (accuracy vs latency over thresholds), plus the sweep overview.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot): no global state, no
display needed, and nothing leaks when hundreds of sweep jobs each draw their plots.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, PercentFormatter

from fedexits.report.files import atomic_save_figure
from fedexits.report.schema import (
    STAGE_AFTER,
    STAGE_BEFORE,
    exit_label,
    ordered_inits,
    ordered_methods,
    with_method,
)

CDF_PNG = "accuracy_cdf.png"
COST_PNG = "accuracy_vs_cost.png"
LATENCY_PNG = "accuracy_vs_latency.png"
SWEEP_PNG = "sweep_accuracy.png"

INIT_COLOURS = {"global": "tab:blue", "federated": "tab:orange", "scratch": "tab:green"}
STAGE_STYLES = {STAGE_BEFORE: "--", STAGE_AFTER: "-"}
STAGE_NAMES = {STAGE_BEFORE: "before personalisation", STAGE_AFTER: "after personalisation"}
ANNOTATED_THRESHOLDS = (0.0, 0.5, 0.8, 0.9, 1.0)


def _figure(panels: int = 1, panel_width: float = 5.0, height: float = 4.0, sharey: bool = False):
    """A figure with `panels` side-by-side axes (returned as a list)."""
    figure = Figure(figsize=(panel_width * max(panels, 1), height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, max(panels, 1), squeeze=False, sharey=sharey)[0]
    return figure, list(axes)


def _no_data(path: Path, title: str) -> Path:
    """An explicit placeholder, so the report never points at a missing image."""
    figure, (axes,) = _figure()
    axes.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=14)
    axes.set_title(title)
    axes.set_axis_off()
    return atomic_save_figure(figure, path)


def _init_colour(init: str, position: int) -> str:
    return INIT_COLOURS.get(init, f"C{(position + 3) % 10}")


def _with_series(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str], str]:
    """The frame with a `series` column (one line colour each), the series in order, and their
    legend prefix: the init when the run has one method (the figures as they always were), the
    method when it has one init, else "init, method"."""
    frame = with_method(frame)
    frame = frame.assign(init=frame["init"].astype(str))
    inits, methods = ordered_inits(frame["init"]), ordered_methods(frame["method"])
    if len(methods) == 1:
        return frame.assign(series=frame["init"]), inits, "init: "
    if len(inits) == 1:
        return frame.assign(series=frame["method"]), methods, "method: "
    series = frame["init"] + ", " + frame["method"]
    present = set(series)
    order = [f"{i}, {m}" for i in inits for m in methods if f"{i}, {m}" in present]
    return frame.assign(series=series), order, ""


def _ecdf(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Step coordinates of the empirical CDF over [0, 1], starting at 0 and ending at 1."""
    ordered = np.sort(values.dropna().to_numpy(dtype=float))
    fractions = np.arange(1, len(ordered) + 1) / max(len(ordered), 1)
    return np.r_[0.0, ordered, 1.0], np.r_[0.0, fractions, 1.0]


def plot_accuracy_cdf(per_user: pd.DataFrame, path: Path) -> Path:
    """Fig. 3b: fraction of users at or below each accuracy, one panel per exit, before (dashed)
    and after (solid) personalisation, one colour per init. Shows who personalisation helps, not
    just the mean; one panel per exit keeps neighbouring exits' curves apart."""
    path = Path(path)
    if per_user is None or per_user.empty:
        return _no_data(path, "Per-user accuracy CDF")
    frame, inits, prefix = _with_series(per_user)
    frame = frame.assign(exit=frame["exit"].astype(int))
    exits = sorted(frame["exit"].unique())
    final_exit = int(frame["exit"].max())
    columns = min(4, len(exits))
    rows = -(-len(exits) // columns)
    figure = Figure(figsize=(3.3 * columns, 2.9 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    panels = list(grid.flat)
    for axes, exit_index in zip(panels, exits):
        rows_of_exit = frame[frame["exit"] == exit_index]
        for position, init in enumerate(inits):
            for stage, style in STAGE_STYLES.items():
                group = rows_of_exit[(rows_of_exit["series"] == init) & (rows_of_exit["stage"] == stage)]
                if group.empty:
                    continue
                x, y = _ecdf(group.groupby("user")["accuracy"].mean())
                axes.step(
                    x, y, where="post", color=_init_colour(init, position), linestyle=style, linewidth=1.5
                )
        name = exit_label(exit_index, final_exit)
        axes.set_title(name + (" (frozen: fail-safe)" if exit_index == final_exit else ""), fontsize=10)
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.02)
        axes.xaxis.set_major_formatter(PercentFormatter(1.0))
        axes.grid(alpha=0.3)
    for axes in panels[len(exits) :]:
        axes.set_axis_off()
    for axes in grid[:, 0]:
        axes.set_ylabel("fraction of users")
    for axes in grid[-1, :]:
        axes.set_xlabel("per-user accuracy")
    n_users = frame["user"].nunique()
    handles = [
        Line2D([], [], color=_init_colour(init, p), label=f"{prefix}{init}") for p, init in enumerate(inits)
    ]
    handles += [
        Line2D([], [], color="grey", linestyle=STAGE_STYLES[s], label=STAGE_NAMES[s])
        for s in (STAGE_BEFORE, STAGE_AFTER)
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    figure.suptitle(f"Per-user accuracy CDF per exit ({n_users} users)")
    return atomic_save_figure(figure, path)


def plot_accuracy_vs_cost(per_user: pd.DataFrame, path: Path) -> Path:
    """Fig. 5: mean accuracy over users at each exit against the MFLOPs and the parameters needed
    to reach it, before (dashed) and after (solid) personalisation, one colour per init."""
    path = Path(path)
    if per_user is None or per_user.empty:
        return _no_data(path, "Accuracy vs cost per exit")
    frame, series, prefix = _with_series(per_user)
    means = frame.groupby(["series", "stage", "exit"])[["accuracy", "mflops", "params"]].mean()
    means = means.reset_index()
    figure, (flops_axes, params_axes) = _figure(2, panel_width=5.2, height=4.2)
    for position, init in enumerate(series):
        for stage, style in STAGE_STYLES.items():
            line = means[(means["series"] == init) & (means["stage"] == stage)].sort_values("exit")
            if line.empty:
                continue
            for axes, cost in ((flops_axes, "mflops"), (params_axes, "params")):
                axes.plot(
                    line[cost],
                    line["accuracy"],
                    linestyle=style,
                    marker="o",
                    color=_init_colour(init, position),
                    label=f"{prefix}{init}, {STAGE_NAMES[stage]}",
                )
    # Label each exit once, next to its highest point (costs are the same for every init).
    final_exit = int(means["exit"].max())
    for exit_index, points in means.groupby("exit"):
        top = points.loc[points["accuracy"].idxmax()]
        for axes, cost in ((flops_axes, "mflops"), (params_axes, "params")):
            axes.annotate(
                exit_label(exit_index, final_exit),
                (top[cost], top["accuracy"]),
                textcoords="offset points",
                xytext=(4, 6),
                fontsize=8,
            )
    flops_axes.set_xlabel("MFLOPs to reach the exit")
    params_axes.set_xlabel("parameters to reach the exit")
    params_axes.xaxis.set_major_formatter(EngFormatter())
    for axes in (flops_axes, params_axes):
        axes.set_ylabel("mean accuracy over users")
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
        axes.grid(alpha=0.3)
    handles, labels = flops_axes.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right center", frameon=False)
    figure.suptitle("Accuracy vs cost per exit")
    return atomic_save_figure(figure, path)


def plot_accuracy_vs_latency(
    sweep: pd.DataFrame, per_user: pd.DataFrame, path: Path, prune_sweep: pd.DataFrame | None = None
) -> Path:
    """Fig. 7: mean accuracy against mean expected latency per sample as the exit threshold goes
    from 0 (everything leaves at the first exit) to 1 (everything runs to the final classifier),
    one line per run (init, or method); stars mark running the final exit only. Pruning methods
    (`prune_sweep`) add their curve over pruning levels (squares, dashed)."""
    path = Path(path)
    if (sweep is None or sweep.empty) and (prune_sweep is None or prune_sweep.empty):
        return _no_data(path, "Accuracy vs latency over thresholds")
    use_latency = _has_latency(sweep, "expected_latency_ms") and _has_latency(prune_sweep, "latency_ms")
    x_column = "expected_latency_ms" if use_latency else "expected_mflops"
    x_label = "mean latency per sample (ms)" if use_latency else "mean MFLOPs per sample"
    figure, (axes,) = _figure(1, panel_width=6.5, height=4.5)
    inits = []
    if sweep is not None and not sweep.empty:
        frame, inits, prefix = _with_series(sweep)
        means = frame.groupby(["series", "threshold"])[["accuracy", x_column]].mean().reset_index()
        for position, init in enumerate(inits):
            line = means[means["series"] == init].sort_values("threshold")
            colour = _init_colour(init, position)
            axes.plot(line[x_column], line["accuracy"], marker=".", color=colour, label=f"{prefix}{init}")
            for threshold in ANNOTATED_THRESHOLDS:
                point = line[np.isclose(line["threshold"], threshold)]
                if not point.empty:
                    axes.annotate(
                        f"t={threshold:g}",
                        (point[x_column].iloc[0], point["accuracy"].iloc[0]),
                        textcoords="offset points",
                        xytext=(5, -10),
                        fontsize=7,
                        color=colour,
                    )
        _mark_final_exit(axes, per_user, inits, "latency_ms" if use_latency else "mflops")
    if prune_sweep is not None and not prune_sweep.empty:
        cost = "latency_ms" if use_latency else "mflops"
        frame = with_method(prune_sweep)
        for position, ((init, method), rows) in enumerate(frame.groupby(["init", "method"])):
            line = rows.groupby("level")[["accuracy", cost]].mean().reset_index()
            label = method if frame["init"].nunique() == 1 else f"{init}, {method}"
            colour = f"C{(position + 6) % 10}"
            axes.plot(line[cost], line["accuracy"], marker="s", linestyle="--", color=colour,
                      label=f"{label} (pruning levels)")  # fmt: skip
            for _, point in line.iterrows():
                xy = (point[cost], point["accuracy"])
                text = f"-{point['level']:.0%}"
                axes.annotate(text, xy, textcoords="offset points", xytext=(5, 4), fontsize=7, color=colour)
    axes.margins(x=0.08)  # room for the threshold labels at both ends
    axes.set_xlabel(x_label)
    axes.set_ylabel("mean accuracy over users")
    axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    axes.set_title("Accuracy vs latency over exit thresholds (t)")
    return atomic_save_figure(figure, path)


def _has_latency(frame: pd.DataFrame | None, column: str) -> bool:
    """True unless the frame has rows but no latency (an absent frame does not count)."""
    if frame is None or frame.empty:
        return True
    return column in frame and bool(frame[column].notna().any())


def _mark_final_exit(axes, per_user: pd.DataFrame | None, series: list[str], cost: str) -> None:
    """A star per line at the final classifier's mean accuracy and cost after personalisation
    (no early exiting)."""
    if per_user is None or per_user.empty or cost not in per_user.columns:
        return
    frame, _, _ = _with_series(per_user)
    frame = frame[frame["stage"] == STAGE_AFTER]
    final = frame[frame["exit"] == frame.groupby("series")["exit"].transform("max")]
    points = final.groupby("series")[["accuracy", cost]].mean()
    labelled = False
    for position, init in enumerate(series):
        if init in points.index and pd.notna(points.loc[init, cost]):
            axes.plot(
                points.loc[init, cost],
                points.loc[init, "accuracy"],
                marker="*",
                markersize=13,
                color=_init_colour(init, position),
                markeredgecolor="black",
                linestyle="none",
                label=None if labelled else "final exit only",
            )
            labelled = True


def _short_job_labels(labels: list[str]) -> dict[str, str]:
    """'3: +experiment=smoke, personalisation.alpha=1' -> '3: alpha=1' when every job shares
    +experiment=smoke and no other key ends in 'alpha': long labels squeeze the axes away."""
    job = {label: label.partition(": ")[0] for label in labels}
    tokens = {label: label.partition(": ")[2].split(", ") for label in labels}
    shared = set.intersection(*(set(t) for t in tokens.values())) if len(tokens) > 1 else set()
    keys = {t.split("=", 1)[0] for ts in tokens.values() for t in ts if t not in shared}
    leaves = [k.rsplit(".", 1)[-1] for k in keys]

    def shorten(token: str) -> str:
        key, equals, value = token.partition("=")
        leaf = key.rsplit(".", 1)[-1]
        return f"{leaf}={value}" if equals and leaves.count(leaf) == 1 else token

    differing = {label: [shorten(t) for t in tokens[label] if t not in shared] for label in labels}
    return {label: f"{job[label]}: " + (", ".join(differing[label]) or "-") for label in labels}


def plot_sweep_accuracy(table: pd.DataFrame, path: Path) -> Path:
    """Sweep overview: mean personalised accuracy per exit, one line per job (labelled by its
    overrides), one panel per init. `table` has columns label, init, exit, accuracy_after_mean."""
    path = Path(path)
    rows = table.dropna(subset=["init", "exit", "accuracy_after_mean"]) if len(table) else table
    if rows.empty:
        return _no_data(path, "Sweep: personalised accuracy per exit")
    inits = ordered_inits(rows["init"])
    colours = {label: f"C{position % 10}" for position, label in enumerate(rows["label"].unique())}
    figure, axes_list = _figure(len(inits), panel_width=4.8, height=4.0, sharey=True)
    for axes, init in zip(axes_list, inits):
        for label, line in rows[rows["init"] == init].groupby("label", sort=False):
            line = line.sort_values("exit")
            axes.plot(
                line["exit"].astype(int),
                line["accuracy_after_mean"],
                marker="o",
                color=colours[label],
            )
        axes.set_title(f"init: {init}")
        axes.set_xlabel("exit (highest = final classifier)")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
        axes.grid(alpha=0.3)
    axes_list[0].set_ylabel("mean personalised accuracy")
    short = _short_job_labels(list(colours))
    handles = [Line2D([], [], color=colours[label], marker="o", label=short[label]) for label in colours]
    figure.legend(
        handles=handles,
        loc="outside lower center",
        ncols=1 if len(inits) == 1 else 2,
        frameon=False,
        fontsize=8,
        title="job: overrides that differ between jobs",
    )
    figure.suptitle("Sweep: personalised accuracy per exit")
    return atomic_save_figure(figure, path)
