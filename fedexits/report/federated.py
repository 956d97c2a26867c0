"""The report's federated part: how each init's exits were paid for (samples, training FLOPs),
and the federated exits' accuracy on the evaluation clients against rounds and samples, with the
centrally trained exits on the same clients as a horizontal reference."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, MaxNLocator

from fedexits.report.files import atomic_save_figure
from fedexits.report.markdown import count, markdown_table, number, percent
from fedexits.report.plots import INIT_COLOURS, _figure, _no_data

FEDERATED_CSV = "federated.csv"
FEDERATED_PNG = "federated_accuracy.png"

BUDGET_HEADERS = {
    "init": "init",
    "trained": "what trained the exits",
    "samples": "samples processed",
    "feature_passes": "frozen-feature passes",
    "tflops": "training TFLOPs",
}
CURVE_HEADERS = {
    "round": "round",
    "samples_cumulative": "samples processed",
    "tflops_cumulative": "training TFLOPs",
    "train_loss": "train loss",
    "accuracy_early_exits": "early exits (mean)",
    "gap_pp": "vs central (pp)",
}


def early_mean(accuracy: list[float]) -> float:
    """Mean over the early exits (the final exit, last, is frozen and the same for every init)."""
    return sum(accuracy[:-1]) / max(len(accuracy) - 1, 1)


def plot_federated_curve(
    frame: pd.DataFrame, reference: dict | None, central: dict | None, path: Path
) -> Path:
    """Mean early-exit accuracy on the evaluation clients against rounds, samples processed and
    training TFLOPs; the central exits on the same clients as a horizontal line, and as a point at
    what central training processed (`central`: its budget row: samples, tflops)."""
    path = Path(path)
    evaluated = (
        frame.dropna(subset=["accuracy_early_exits"]) if "accuracy_early_exits" in frame else frame.iloc[:0]
    )
    if evaluated.empty:
        return _no_data(path, "Federated exits on the evaluation clients")
    figure, panels = _figure(panels=3, panel_width=4.2, sharey=True)
    axes_x = {
        "round": "round",
        "samples_cumulative": "samples processed",
        "tflops_cumulative": "training TFLOPs",
    }
    central_x = {"samples_cumulative": "samples", "tflops_cumulative": "tflops"}
    level = None if reference is None else early_mean(reference["accuracy"])
    for axes, (column, label) in zip(panels, axes_x.items()):
        axes.plot(evaluated[column], evaluated["accuracy_early_exits"], "o-", color=INIT_COLOURS["federated"])
        if level is not None:
            axes.axhline(level, color=INIT_COLOURS["global"], linestyle="--")
            if central and column in central_x:
                axes.plot([central[central_x[column]]], [level], "s", color=INIT_COLOURS["global"])
        axes.set_xlabel(label)
        axes.grid(alpha=0.3)
    panels[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    panels[1].xaxis.set_major_formatter(EngFormatter())
    panels[0].set_ylabel("mean early-exit accuracy, evaluation clients")
    panels[0].set_ylim(0, 1)
    handles = [
        Line2D([], [], color=INIT_COLOURS["federated"], marker="o", label="federated exits"),
        Line2D([], [], color=INIT_COLOURS["global"], linestyle="--", label="central exits, same clients"),
        Line2D(
            [],
            [],
            color=INIT_COLOURS["global"],
            marker="s",
            linestyle="",
            label="what central training processed",
        ),
    ]
    panels[-1].legend(handles=handles, loc="lower right", fontsize=8)
    figure.suptitle("Federated exit training")
    return atomic_save_figure(figure, path)


def federated_section(
    summary_federated: dict | None, frame: pd.DataFrame | None, figure: str | None
) -> list[str]:
    """report.md lines for the federated exit training (empty when it did not run)."""
    if not summary_federated or frame is None:
        return []
    reference = summary_federated.get("reference")
    curve = (
        frame.dropna(subset=["accuracy_early_exits"]).copy()
        if "accuracy_early_exits" in frame
        else frame.iloc[:0]
    )
    if reference is not None and not curve.empty:
        curve["gap_pp"] = 100 * (curve["accuracy_early_exits"] - early_mean(reference["accuracy"]))
    lines = [
        "## Federated exit training",
        "",
        (
            f"Strategy `{summary_federated['strategy']}`, {len(frame) - 1} rounds of "
            f"{summary_federated['clients_per_round']} clients x "
            f"{summary_federated['local_epochs']} local epochs, "
            f"sampled from {summary_federated['train_clients']} training clients of the global population. "
            f"{len(summary_federated['eval_users'])} other global users never train and evaluate the exits "
            "(mean over clients of each exit's accuracy on all their images); held-out users, personalised "
            "below, take no part."
        ),
        "",
    ]
    if reference is not None:
        lines += [
            (
                f"Central exits on the same evaluation clients: {percent(early_mean(reference['accuracy']))} "
                "(mean over early exits). Central training saw these clients' images, so this reference is "
                "optimistic; the unbiased comparison is *early exits before* on the held-out users above."
            ),
            "",
        ]
    formats = {
        "samples_cumulative": count,
        "tflops_cumulative": lambda v: number(v, 3),
        "train_loss": lambda v: number(v, 3),
        "accuracy_early_exits": percent,
        "gap_pp": lambda v: number(v, 1),
    }
    headers = {k: v for k, v in CURVE_HEADERS.items() if k in curve.columns}
    lines += [markdown_table(curve, headers, formats), ""]
    cached = int(frame["features_cached"].sum())
    participations = int(frame["clients_ok"].sum())
    lines += [
        (
            f"Client features kept from an earlier round: {cached} of {participations} participations "
            "(per client process; the rest computed their frozen features)."
        ),
        "",
    ]
    failures = summary_federated.get("failures") or []
    if failures:
        lines += [
            f"{len(failures)} client message(s) failed, e.g. round {failures[0]['round']} "
            f"({failures[0]['stage']}): {failures[0]['error']}",
            "",
        ]
    if figure:
        lines += [f"![Federated exit training]({figure})", ""]
    lines += [f"Every round: [`{FEDERATED_CSV}`]({FEDERATED_CSV}).", ""]
    return lines


def budget_section(budget: pd.DataFrame | None) -> list[str]:
    if budget is None or budget.empty:
        return []
    return [
        "## What trained the exits",
        "",
        (
            "Samples processed: image passes through a training step. Training FLOPs: forward and backward "
            "as torch runs them (flop counter), plus, for federated rounds, one frozen-feature pass per "
            "client and round. Every init's backbone comes from the same central training; personalisation "
            "is not counted (the same for every init)."
        ),
        "",
        markdown_table(
            budget,
            BUDGET_HEADERS,
            {"samples": count, "feature_passes": count, "tflops": lambda v: number(v, 3)},
        ),
        "",
    ]
