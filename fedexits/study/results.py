"""A run's outcome -> its report, and whether the run counts as a success.

A run in which users fail reports them (failures.csv, report.md); it fails (non-zero exit, summary
status "failed") when no user has a result, when more than `simulation.max_failed_fraction` of
the users failed, or when any client raised an unexpected error (a bug, whose traceback is in the
log). The report is written either way: nothing already computed is thrown away.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..engine.pruning import PRUNING_METHODS
from ..report import write_run_report
from ..report.records import UserRecord
from ..report.results import build_frames
from .budget import budget_table, federated_frame
from .prepare import Prepared


@dataclass
class RunOutcome:
    records: list[UserRecord]
    federated: dict | None = None  # federated exit training: every round, evaluations, failures
    timings: dict = field(default_factory=dict)


def run_status(records: list[UserRecord], max_failed_fraction: float) -> dict:
    """{"status": "ok" | "failed", "reason": str, users ok/failed/total, bugs} for the report."""
    users = {r.user for r in records}
    failed = {r.user for r in records if r.result is None}
    bugs = sorted({r.user for r in records if r.failure is not None and r.failure.kind == "bug"})
    status = {"users_total": len(users), "users_failed": len(failed), "bugs": len(bugs)}
    if not users or len(failed) == len(users):
        return {**status, "status": "failed", "reason": "no user has a result"}
    if bugs:
        return {
            **status,
            "status": "failed",
            "reason": f"unexpected errors (bugs) for {len(bugs)} user(s), e.g. {bugs[0]}",
        }
    share = len(failed) / len(users)
    if share > max_failed_fraction:
        return {
            **status,
            "status": "failed",
            "reason": f"{len(failed)} of {len(users)} users failed ({share:.0%} > "
            f"simulation.max_failed_fraction={max_failed_fraction:g})",
        }
    return {**status, "status": "ok", "reason": ""}


def _latency_meta(prepared: Prepared) -> dict | None:
    """How latency was measured and what the full network costs per sample at each batch size."""
    profile, table = prepared.plan.latency, prepared.latency_table
    if profile is None:
        return None
    full = {} if table is None else table[table["exit"] == table["exit"].max()]
    per_sample = {} if table is None else dict(zip(full["batch_size"], full["per_sample_ms"]))
    return {"runtime": profile.runtime, "threads": profile.threads, "full_network_ms_per_sample": per_sample}


def write_results(out_dir: str | Path, prepared: Prepared, outcome: RunOutcome) -> dict:
    """Every output file of a run into `out_dir`; returns the summary (with its status)."""
    settings = prepared.plan.settings
    frames = build_frames(outcome.records, prepared.cost_table)
    p = settings.personalisation
    population = {k: v for k, v in prepared.population.items() if k != "settings"}
    meta = {
        "status": run_status(outcome.records, settings.simulation.max_failed_fraction),
        "seed": settings.seed,
        "dataset": population,
        "model": prepared.plan.architecture,
        # each user's seed comes from `seed` and the user's id (personalisation.seed is unused)
        "personalisation": {k: v for k, v in asdict(p).items() if k != "seed" and _shown(k, p.methods)},
        "calibration": asdict(settings.calibration),
        "calibration_split": calibration_split(settings),
        "latency": _latency_meta(prepared),
        "inits": settings.init.inits,
        "global_training": {**asdict(settings.global_training), **prepared.training},
        "federated": asdict(settings.federated) if "federated" in settings.init.inits else None,
        "federated_history": outcome.federated,
        "timings": {**prepared.timings, **outcome.timings},
    }
    federated = (
        None if outcome.federated is None else federated_frame(outcome.federated, prepared.flops_per_image)
    )
    return write_run_report(
        out_dir,
        frames["per_user"],
        frames["thresholds"],
        frames["sweep"],
        frames["failures"],
        meta,
        cost_table=prepared.cost_table,
        federated=federated,
        budget=budget_table(settings, prepared.training, prepared.flops_per_image, outcome.federated),
        latency_table=prepared.latency_table,
        prune_sweep=frames["prune_sweep"],
    )


def calibration_split(settings) -> str:
    """Which images each user's threshold was calibrated on (stated in the report)."""
    exits = settings.personalisation.method == "exits"
    if exits and settings.calibration.route == "out_of_fold":
        folds = settings.calibration.out_of_fold.folds
        return (
            f"out-of-fold outputs on every personalisation image ({folds} folds; the guard decides "
            "on the same outputs, the deployed exits train on every image)"
        )
    if exits and settings.personalisation.guard:
        return "the guard's validation split (the same images decide the guard and the threshold)"
    return "the personalisation split"


def _shown(setting: str, methods: list[str]) -> bool:
    """The pruning settings are reported when a pruning method ran (the rest always)."""
    return not setting.startswith("prune_") or bool(set(methods) & set(PRUNING_METHODS))
