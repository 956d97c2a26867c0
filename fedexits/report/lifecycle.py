"""The lifecycle run's report: the issue's targets per policy, accuracy and cost per input over
days (median and inter-quartile band across users), the drift detection delay (CDF across
users), training compute against the accuracy it bought, and the paper's Fig. 4."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from .files import atomic_save_figure, atomic_write_csv, atomic_write_text
from .markdown import markdown_table, number, percent
from .plots import _ecdf, _figure, _no_data

TIMELINE_COLUMNS = [
    "user", "day", "policy", "accuracy", "final_accuracy", "mflops", "latency_ms", "threshold",
    "drift_active", "drift_flagged", "personalised", "train_mflops",
]  # fmt: skip
OVER_DAYS_PNG = "lifecycle_over_days.png"
DELAY_PNG = "lifecycle_drift_delay.png"
COMPUTE_PNG = "lifecycle_compute_vs_accuracy.png"
FIG4_PNG = "lifecycle_fig4.png"
TARGETS_CSV = "lifecycle_targets.csv"


def target_metrics(timeline: pd.DataFrame, drift_days: Mapping, full_mflops: float) -> pd.DataFrame:
    """Per policy, the issue's targets: drifted users over the days from their drift on (gap to
    the final exit on the same inputs, share within 2 pp, FLOPs share of the full network, the
    detection delay); users without drift over the whole run (accuracy, training compute).
    `timeline` needs the `measured` column (lifecycle_details.csv): accuracies are pooled over
    measured inputs."""
    # float: a run without any drift maps every user to None, which would not compare with days
    t = timeline.assign(drift_day=timeline.user.map(dict(drift_days)).astype(float))
    t["correct"] = t.accuracy.fillna(0) * t.measured
    t["final_correct"] = t.final_accuracy.fillna(0) * t.measured
    drifted = t[t.drift_day.notna() & (t.day >= t.drift_day)]
    steady = t[t.drift_day.isna()]
    rows = []
    for policy, group in t.groupby("policy", sort=False):
        row = {"policy": policy}
        d = drifted[drifted.policy == policy].groupby("user")
        d = d.agg({"correct": "sum", "final_correct": "sum", "measured": "sum", "mflops": "mean"})
        if len(d):
            gap = (d.final_correct - d.correct) / d.measured * 100
            delays = detection_delays(group, drift_days)
            row |= {
                "drifted_users": len(d),
                "drifted_accuracy": d.correct.sum() / d.measured.sum(),
                "drifted_final_accuracy": d.final_correct.sum() / d.measured.sum(),
                "drifted_gap_pp_mean": gap.mean(),
                "drifted_within_2pp": (gap <= 2).mean(),
                "drifted_flops_share": d.mflops.mean() / full_mflops,
                "median_delay_days": float(delays.median()) if len(delays) else np.nan,
                "drifted_flagged": float(np.isfinite(delays).mean()) if len(delays) else np.nan,
            }
        s = steady[steady.policy == policy]
        if len(s):
            users = s.user.nunique()
            row |= {
                "steady_users": users,
                "steady_accuracy": s.correct.sum() / s.measured.sum(),
                "steady_final_accuracy": s.final_correct.sum() / s.measured.sum(),
                "steady_flops_share": s.mflops.mean() / full_mflops,
                "steady_train_gflops_per_user": s.train_mflops.sum() / users / 1e3,
                "steady_false_alarm_users": s.groupby("user").drift_flagged.any().mean(),
            }
        row["train_gflops_per_user"] = group.train_mflops.sum() / group.user.nunique() / 1e3
        row["accuracy"] = group.correct.sum() / max(1, group.measured.sum())
        rows.append(row)
    return pd.DataFrame(rows).set_index("policy")


def detection_delays(timeline: pd.DataFrame, drift_days: Mapping) -> pd.Series:
    """Per drifted user of one policy's timeline: days from its drift to the first day it ends
    flagged (0: the same day; inf: never)."""
    delays = {}
    users = set(timeline.user)
    for user, day in drift_days.items():
        if day is None or user not in users:
            continue
        own = timeline[(timeline.user == user) & (timeline.day >= day) & timeline.drift_flagged.astype(bool)]
        delays[user] = own.day.min() - day if len(own) else np.inf
    return pd.Series(delays, dtype=float)


def target_checks(metrics: pd.DataFrame) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the issue's targets; met is None when not measurable."""

    def get(policy, column):
        if policy in metrics.index and column in metrics.columns:
            return metrics.loc[policy, column]
        return np.nan

    def row(target, measured, ok):
        return (target, measured, None if pd.isna(ok) else bool(ok))

    within = get("orchestrator", "drifted_within_2pp")
    share = get("orchestrator", "drifted_flops_share")
    once_gap, orch_gap = get("once", "drifted_gap_pp_mean"), get("orchestrator", "drifted_gap_pp_mean")
    delay = get("orchestrator", "median_delay_days")
    acc_o, acc_n = get("orchestrator", "steady_accuracy"), get("nightly", "steady_accuracy")
    train_o, train_n = (
        get("orchestrator", "steady_train_gflops_per_user"),
        get("nightly", "steady_train_gflops_per_user"),
    )
    ratio = train_o / train_n if train_n else np.nan
    nan = np.nan
    return [
        row("drifted: orchestrator within 2 pp of the final exit for >= 90% of users", percent(within),
            within >= 0.9 if not pd.isna(within) else nan),
        row("drifted: orchestrator FLOPs per input <= 60% of the full network", percent(share),
            share <= 0.6 if not pd.isna(share) else nan),
        row("drifted: once falls further below the final exit than the orchestrator",
            f"{number(once_gap)} pp vs {number(orch_gap)} pp",
            once_gap > orch_gap if not (pd.isna(once_gap) or pd.isna(orch_gap)) else nan),
        row("drifted: median delay from drift to drift_flagged <= 2 days", number(delay, 1),
            delay <= 2 if not pd.isna(delay) else nan),
        row("no drift: orchestrator accuracy within 1 pp of nightly", f"{number((acc_o - acc_n) * 100)} pp",
            abs(acc_o - acc_n) * 100 <= 1 if not (pd.isna(acc_o) or pd.isna(acc_n)) else nan),
        row("no drift: orchestrator training compute <= 35% of nightly's", percent(ratio),
            ratio <= 0.35 if not pd.isna(ratio) else nan),
    ]  # fmt: skip


def plot_over_days(timeline: pd.DataFrame, path: Path) -> Path:
    """Accuracy and MFLOPs per input over days, per policy: median across users, IQR band."""
    if timeline.empty:
        return _no_data(path, "accuracy and cost over days")
    figure, axes = _figure(2, panel_width=6.0)
    for (column, title), ax in zip((("accuracy", "accuracy"), ("mflops", "MFLOPs per input")), axes):
        for i, (policy, group) in enumerate(timeline.groupby("policy", sort=False)):
            q = group.groupby("day")[column].quantile([0.25, 0.5, 0.75]).unstack()
            ax.plot(q.index, q[0.5], label=policy, color=f"C{i}")
            ax.fill_between(q.index, q[0.25], q[0.75], color=f"C{i}", alpha=0.15)
        ax.set_xlabel("day")
        ax.set_title(f"{title} (median, IQR across users)")
    axes[0].legend(fontsize=8)
    return atomic_save_figure(figure, path)


def plot_delay_cdf(delays: pd.Series, days: int, path: Path) -> Path:
    """CDF across drifted users of the orchestrator's detection delay (never flagged: off the
    right edge, so the curve ends below 1)."""
    if delays.empty:
        return _no_data(path, "drift detection delay")
    figure, (ax,) = _figure()
    finite = delays[np.isfinite(delays)]
    x, y = _ecdf(finite)
    y = y * len(finite) / len(delays)
    ax.step(np.r_[x[1:-1], days], np.r_[y[1:-1], y[-2] if len(y) > 2 else 0], where="post")
    ax.set_xlabel("days from the drift to drift_flagged")
    ax.set_ylabel("share of drifted users")
    ax.set_ylim(0, 1)
    ax.set_title("drift detection delay (orchestrator)")
    return atomic_save_figure(figure, path)


def plot_compute_vs_accuracy(metrics: pd.DataFrame, path: Path) -> Path:
    if metrics.empty:
        return _no_data(path, "training compute vs accuracy")
    figure, (ax,) = _figure()
    for i, (policy, row) in enumerate(metrics.iterrows()):
        ax.scatter(row.train_gflops_per_user, 100 * row.accuracy, color=f"C{i}", label=policy)
    ax.set_xlabel("personalisation compute per user (GFLOPs, whole run)")
    ax.set_ylabel("accuracy over the run (%)")
    ax.legend(fontsize=8)
    ax.set_title("training compute vs accuracy")
    return atomic_save_figure(figure, path)


def plot_fig4(fig4: pd.DataFrame, path: Path) -> Path:
    if fig4.empty:
        return _no_data(path, "accuracy vs personalisation samples")
    figure, (ax,) = _figure()
    curves = fig4.groupby(["exit", "n_samples"]).accuracy.mean().unstack(0)
    final = curves.columns.max()
    for k in curves.columns:
        ax.plot(curves.index, 100 * curves[k], marker="o", label="final" if k == final else f"exit {k}")
    ax.set_xlabel("personalisation samples")
    ax.set_ylabel("test accuracy (%), mean over users")
    ax.legend(fontsize=8)
    ax.set_title(f"accuracy of each exit vs samples ({fig4.user.nunique()} users)")
    return atomic_save_figure(figure, path)


def write_lifecycle_report(
    out: Path,
    details: pd.DataFrame,
    failures: pd.DataFrame,
    fig4: pd.DataFrame,
    drift_days: Mapping,
    meta: dict,
) -> dict:
    """Targets table, figures and report.md; returns the summary (meta, targets, per policy)."""
    metrics = target_metrics(details, drift_days, meta["full_mflops"]) if len(details) else pd.DataFrame()
    orchestrator = details[details.policy == "orchestrator"] if len(details) else details
    delays = detection_delays(orchestrator, drift_days) if len(orchestrator) else pd.Series(dtype=float)
    atomic_write_csv(metrics.reset_index(), out / TARGETS_CSV)
    plot_over_days(details, out / OVER_DAYS_PNG)
    plot_delay_cdf(delays, meta["lifecycle"]["stream"]["days"], out / DELAY_PNG)
    plot_compute_vs_accuracy(metrics, out / COMPUTE_PNG)
    plot_fig4(fig4, out / FIG4_PNG)
    checks = target_checks(metrics) if len(metrics) else []
    state_kb = state_size_kb(details)
    text = lifecycle_markdown(metrics, checks, failures, fig4, meta, state_kb)
    atomic_write_text(out / "report.md", text)
    return {
        "meta": meta,
        "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in checks],
        "policies": metrics.reset_index().to_dict("records"),
        "drift_users": sum(d is not None for d in drift_days.values()),
        "state_kb": state_kb,
    }


def state_size_kb(details: pd.DataFrame) -> dict[str, float]:
    """The largest per-user state Context.state carried between two days, in kB: every policy's
    together (`all`) and each policy's (empty without a `state_bytes` column)."""
    if "state_bytes" not in details or not len(details):
        return {}
    together = details.groupby(["user", "day"]).state_bytes.sum().max()
    return {"all": together / 1024, **(details.groupby("policy").state_bytes.max() / 1024).to_dict()}


def lifecycle_markdown(
    metrics, checks, failures: pd.DataFrame, fig4: pd.DataFrame, meta: dict, state_kb: dict | None = None
) -> str:
    config, status = meta["lifecycle"], meta["status"]
    stream, drift = config["stream"], config["drift"]
    met = {True: "yes", False: "**no**", None: "n/a"}
    drift_text = (
        "no drift"
        if drift["scenario"] == "none"
        else f"drift `{drift['scenario']}` for a seeded {drift['share']:.0%} of users "
        f"on a day in [{drift['first_day']}, {drift['last_day']}]"
    )
    lines = [
        "# Lifelong personalisation",
        "",
        f"Run status: {status['status']}{': ' + status['reason'] if status['reason'] else ''} "
        f"({status['users_total']} users, {status['users_failed']} with a failure).",
        f"{stream['days']} days x {stream['inputs_per_day']} inputs per day, label fraction "
        f"{stream['label_fraction']}; {drift_text}; buffer {config['buffer_size']} inputs. "
        f"Full network: {meta['full_mflops']:.1f} MFLOPs per input. Policies share every stream.",
        "",
    ]
    if state_kb:
        per_policy = ", ".join(f"{policy} {kb:.0f}" for policy, kb in state_kb.items() if policy != "all")
        lines += [
            f"Largest per-user state kept in Context.state between days: {state_kb['all']:.0f} kB for "
            f"all policies together (per policy, kB: {per_policy}).",
            "",
        ]
    lines += [
        "## Targets",
        "",
        markdown_table(pd.DataFrame(checks, columns=["target", "measured", "met"]), formats={"met": met.get}),
        "",
        "## Per policy",
        "",
    ]
    if len(metrics):
        columns = {
            "policy": "policy",
            "drifted_accuracy": "drifted acc.",
            "drifted_final_accuracy": "final exit",
            "drifted_within_2pp": "within 2 pp",
            "drifted_flops_share": "FLOPs share",
            "median_delay_days": "median delay (days)",
            "steady_accuracy": "no-drift acc.",
            "steady_train_gflops_per_user": "no-drift train GFLOPs/user",
            "train_gflops_per_user": "train GFLOPs/user",
        }
        formats = {k: percent for k in ("drifted_accuracy", "drifted_final_accuracy", "drifted_within_2pp",
                                        "drifted_flops_share", "steady_accuracy")}  # fmt: skip
        formats |= {
            k: number for k in ("median_delay_days", "steady_train_gflops_per_user", "train_gflops_per_user")
        }
        frame = metrics.reset_index()
        lines += [markdown_table(frame, {k: v for k, v in columns.items() if k in frame}, formats), ""]
    lines += [
        "Drifted users are measured from their drift day on; users without drift over the whole run. "
        "Accuracies pool the measured inputs (never trained on before).",
        "",
        f"![accuracy and cost over days]({OVER_DAYS_PNG})",
        "",
        f"![drift detection delay]({DELAY_PNG})",
        "",
        f"![training compute vs accuracy]({COMPUTE_PNG})",
        "",
        f"![Fig. 4: accuracy vs personalisation samples]({FIG4_PNG})",
        "",
    ]
    if len(fig4):
        table = fig4.groupby(["n_samples", "exit"]).accuracy.mean().unstack("exit").reset_index()
        table.columns = [str(c) for c in table.columns]
        lines += [
            f"Fig. 4 (mean test accuracy of each exit over {fig4.user.nunique()} users; the last "
            f"column is the "
            f"final exit): the orchestrator personalises once `orchestrator.min_new_samples` = "
            f"{config['orchestrator']['min_new_samples']} new samples are buffered.",
            "",
            markdown_table(table, formats={c: percent for c in table.columns if c != "n_samples"}),
            "",
        ]
    lines += ["## Failures", ""]
    lines += [markdown_table(failures) if len(failures) else "None.", ""]
    timings = meta.get("timings", {})
    lines += [
        "## Timings",
        "",
        ", ".join(f"{k} {v:.1f}" for k, v in timings.items() if isinstance(v, float)),
        "",
    ]
    return "\n".join(lines)
