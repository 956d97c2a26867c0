"""Lifecycle mode (`python -m fedexits.simulate +experiment=lifecycle`): held-out users live
`lifecycle.stream.days` days under every policy of `lifecycle.policies`. No Flower here: the
Flower client (`fl/lifecycle_client.py`, one server round = one day) keeps each user's compact
`UserState` per policy in its `Context.state` and calls `LifecycleWorker.live_day`; the server
(`fl/lifecycle_server.py`) collects each day's rows into a `LifecycleOutcome`, which
`write_lifecycle_results` turns into timeline.csv and the report.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..data import build_population
from ..data.streams import drift_day, user_stream
from ..engine import ExitCosts, load_model
from ..engine.lifecycle import Lifecycle, day_features, run_day
from ..engine.lifecycle_run import accuracy_vs_samples
from ..engine.user_state import UserState
from ..errors import UserDataError, one_line
from ..report.files import atomic_write_csv, atomic_write_json
from ..report.lifecycle import TIMELINE_COLUMNS, write_lifecycle_report
from .plan import RunPlan, lifecycle_partition_users
from .prepare import Prepared
from .protocol import user_seed

FEDAVG = "orchestrator+fedavg"
FAILURE_COLUMNS = ["user", "day", "policy", "error"]  # day -1: before the first day; policy "": all


@dataclass
class UserDay:
    """What one user's client reports for one day."""

    rows: list[dict]  # DayRecord fields, one per policy that lived the day
    failures: list[dict]  # FAILURE_COLUMNS, one per policy that failed today
    exits: dict[str, torch.Tensor] | None = None  # orchestrator+fedavg's exits personalised tonight
    num_samples: int = 0  # their training samples (the FedAvg weight)


@dataclass
class LifecycleOutcome:
    rows: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    users: list[str] = field(default_factory=list)  # the users who took part
    fedavg_nights: int = 0  # nights the server averaged exits
    timings: dict = field(default_factory=dict)


class LifecycleWorker:
    """Per process: the population, the frozen model and the engine's `Lifecycle`, built once
    from the run plan. Streams are cached (a pure function of seed and user, not state)."""

    def __init__(self, plan: RunPlan):
        settings = plan.settings
        self.plan = plan
        self.population = build_population(settings.dataset)
        self.users = lifecycle_partition_users(self.population, settings.simulation.num_users, settings.seed)
        model, _ = load_model(plan.checkpoint)
        self.lifecycle = Lifecycle(
            model,
            settings.lifecycle,
            settings.personalisation.for_user(settings.seed),  # run_day seeds each night per user
            self.population.model_input,
            settings.calibration,
            latency=plan.latency.costs() if plan.latency else None,
        )

    @functools.lru_cache(maxsize=64)  # noqa: B019 (one worker per process and plan)
    def stream(self, user: str):
        config = self.plan.settings.lifecycle
        return user_stream(self.population, user, config.stream, config.drift, config.seed)

    def live_day(
        self,
        user: str,
        day: int,
        states: dict[str, UserState],
        failed: set[str],
        start_exits: dict[str, torch.Tensor] | None = None,
    ) -> UserDay:
        """Every policy of `user` lives `day`: `states` (policy -> state, missing = a new user)
        and `failed` (policies that failed on an earlier day) are updated in place. Raises
        UserDataError when the user's stream cannot be built (the whole user fails)."""
        lifecycle = self.lifecycle
        inputs = self.stream(user).day(day)
        features = day_features(lifecycle, inputs)
        result = UserDay(rows=[], failures=[])
        try:
            for policy in lifecycle.config.policies:
                if policy in failed:
                    continue
                state = states.get(policy) or lifecycle.new_state()
                start = start_exits if policy == FEDAVG else None
                try:
                    outcome = run_day(policy, state, lifecycle, inputs, start, features)
                except UserDataError as exc:
                    failed.add(policy)
                    result.failures.append(dict(user=user, day=day, policy=policy, error=one_line(exc)))
                    continue
                states[policy] = outcome.state
                result.rows.append(outcome.record.to_dict())
                if policy == FEDAVG and outcome.exits is not None:
                    result.exits, result.num_samples = outcome.exits, outcome.num_samples
        finally:
            lifecycle.load(None)
        return result


@functools.lru_cache(maxsize=2)
def get_lifecycle_worker(plan_json: str) -> LifecycleWorker:
    return LifecycleWorker(RunPlan.from_json(plan_json))


def lifecycle_users(prepared: Prepared) -> list[int]:
    """Partition ids of the users who live the run: all of them, since a lifecycle run's
    partitions are only the seeded sample of held-out users (`lifecycle_partition_users`)."""
    return list(range(len(prepared.users)))


def fig4_curves(prepared: Prepared, users: list[str]) -> pd.DataFrame:
    """The paper's Fig. 4 on `users`: every exit's test accuracy after personalising the shared
    exits on n of the user's personalisation images (rows: user, n_samples, exit, accuracy)."""
    settings = prepared.plan.settings
    population = build_population(settings.dataset)
    model, _ = load_model(prepared.plan.checkpoint)
    frames = []
    for user in users:
        seed = user_seed(settings.seed, user)
        try:
            data = population.load_user(user, seed=seed)
        except UserDataError:
            continue  # the user's failure is already in the timeline's failures
        curve = accuracy_vs_samples(
            model,
            (data.train_x, data.train_y, data.labelled),
            (data.test_x, data.test_y),
            settings.lifecycle.fig4_counts,
            settings.personalisation.for_user(seed),
            seed=seed,
        )
        frames.append(curve.assign(user=user))
    columns = ["user", "n_samples", "exit", "accuracy"]
    return pd.concat(frames)[columns] if frames else pd.DataFrame(columns=columns)


def write_lifecycle_results(out_dir: str | Path, prepared: Prepared, outcome: LifecycleOutcome) -> dict:
    """timeline.csv (exactly TIMELINE_COLUMNS), lifecycle_details.csv (every DayRecord field),
    lifecycle_failures.csv, fig4.csv, the figures, report.md and summary.json. Returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = prepared.plan.settings
    config = settings.lifecycle
    details = pd.DataFrame(outcome.rows)
    if len(details):
        order = {p: i for i, p in enumerate(config.policies)}
        details = details.sort_values(
            ["user", "day", "policy"], key=lambda c: c.map(order) if c.name == "policy" else c
        )
    else:
        details = pd.DataFrame(columns=TIMELINE_COLUMNS)
    failures = pd.DataFrame(outcome.failures, columns=FAILURE_COLUMNS)
    drift_days = {user: drift_day(config.seed, user, config.drift) for user in outcome.users}
    atomic_write_csv(details[TIMELINE_COLUMNS], out / "timeline.csv")
    atomic_write_csv(details, out / "lifecycle_details.csv")
    atomic_write_csv(failures, out / "lifecycle_failures.csv")
    started = time.perf_counter()  # after the timeline is safe on disk: Fig. 4 trains again
    fig4 = fig4_curves(prepared, outcome.users[: config.fig4_users])
    outcome.timings["fig4_s"] = time.perf_counter() - started
    atomic_write_csv(fig4, out / "fig4.csv")
    failed_users = set(failures.user)  # a user who failed on some day, under some policy
    share = len(failed_users) / max(1, len(outcome.users))
    status = {
        "status": "ok",
        "reason": "",
        "users_total": len(outcome.users),
        "users_failed": len(failed_users),
    }
    if details.empty:
        status |= {"status": "failed", "reason": "no user lived a day"}
    elif share > settings.simulation.max_failed_fraction:
        status |= {
            "status": "failed",
            "reason": f"{len(failed_users)} of {len(outcome.users)} users failed on some day ({share:.0%} > "
            f"simulation.max_failed_fraction={settings.simulation.max_failed_fraction:g})",
        }
    meta = {
        "status": status,
        "mode": "lifecycle",
        "seed": settings.seed,
        "lifecycle": asdict(config),
        "personalisation": {k: v for k, v in asdict(settings.personalisation).items() if k != "seed"},
        "calibration": asdict(settings.calibration),
        "model": prepared.plan.architecture,
        "global_training": {**asdict(settings.global_training), **prepared.training},
        "full_mflops": ExitCosts.flops(prepared.cost_table).full,
        "fedavg_nights": outcome.fedavg_nights,
        "timings": {**prepared.timings, **outcome.timings},
    }
    summary = write_lifecycle_report(out, details, failures, fig4, drift_days, meta)
    atomic_write_json(summary, out / "summary.json")
    return summary
