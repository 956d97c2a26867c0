"""The report's federated part: how each init's exits were paid for (samples, training FLOPs),
and the federated exits' accuracy on the evaluation clients against rounds and samples, with the
centrally trained exits on the same clients as a horizontal reference."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

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
    frame: pd.DataFrame, reference: dict | None, central_samples: int | None, path: Path
) -> Path:
    """Mean early-exit accuracy on the evaluation clients against rounds and against samples
    processed; the central exits on the same clients as a horizontal line (and, on the samples
    axis, as a point at the samples central training processed)."""
    path = Path(path)
    evaluated = (
        frame.dropna(subset=["accuracy_early_exits"]) if "accuracy_early_exits" in frame else frame.iloc[:0]
    )
    if evaluated.empty:
        return _no_data(path, "Federated exits on the evaluation clients")
    figure, (by_round, by_samples) = _figure(panels=2, sharey=True)
    colour = INIT_COLOURS["federated"]
    by_round.plot(
        evaluated["round"], evaluated["accuracy_early_exits"], "o-", color=colour, label="federated exits"
    )
    by_samples.plot(
        evaluated["samples_cumulative"],
        evaluated["accuracy_early_exits"],
        "o-",
        color=colour,
        label="federated exits",
    )
    if reference is not None:
        level = early_mean(reference["accuracy"])
        for axes in (by_round, by_samples):
            axes.axhline(
                level, color=INIT_COLOURS["global"], linestyle="--", label="central exits (same clients)"
            )
        if central_samples:
            by_samples.plot(
                [central_samples], [level], "s", color=INIT_COLOURS["global"], label="central: samples"
            )
    by_round.set_xlabel("round")
    by_samples.set_xlabel("samples processed (image passes through exit training)")
    by_samples.set_xscale(
        "symlog", linthresh=max(1.0, float(evaluated["samples_cumulative"].iloc[min(1, len(evaluated) - 1)]))
    )
    by_round.set_ylabel("mean early-exit accuracy, evaluation clients")
    by_round.set_ylim(0, 1)
    for axes in (by_round, by_samples):
        axes.grid(alpha=0.3)
    by_samples.legend(loc="lower right", fontsize=8)
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
