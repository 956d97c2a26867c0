"""The lifecycle in one process (notebooks, tests, simulations/): users x days x policies, and the
measurement behind the minimum-new-samples rule (the paper's Fig. 4).

    lifecycle = Lifecycle(model, LifecycleConfig(), PersonalisationConfig(), population.model_input)
    result = run_lifecycle(population, population.held_out_users[:20], lifecycle)
    result.timeline  # one row per user, day and policy (DayRecord fields)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pandas as pd
import torch

from ..data.base import Population
from ..data.streams import user_stream
from ..errors import UserDataError, one_line
from .features import FrozenFeatures
from .inference import exit_accuracies
from .lifecycle import DayRecord, Lifecycle, day_features, run_day
from .personalise import PersonalisationConfig, personalise


@dataclass
class LifecycleResult:
    timeline: pd.DataFrame  # DayRecord fields, one row per (user, day, policy)
    failures: pd.DataFrame  # user, day (-1: before day 0), policy ("" = every policy), error
    drift_days: dict[str, int | None]  # per user: the day its stream drifts (None: never)


def average_exits(returned: Sequence[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """FedAvg over exits: the sample-weighted mean of every floating-point tensor (integer
    buffers such as BatchNorm's step counter take the first user's). In-process stand-in for
    the Flower strategy's aggregation in the federated run."""
    total = sum(n for _, n in returned)
    if not returned or total <= 0:
        raise ValueError("average_exits needs at least one (exits, num_samples > 0)")
    first = returned[0][0]
    average = {}
    for name, tensor in first.items():
        if tensor.is_floating_point():
            average[name] = sum(exits[name].double() * (n / total) for exits, n in returned).to(tensor.dtype)
        else:
            average[name] = tensor.clone()
    return average


def run_lifecycle(
    population: Population, users: Sequence[str], lifecycle: Lifecycle, progress: bool = False
) -> LifecycleResult:
    """Every user lives every day under every policy of `lifecycle.config`, days in lockstep (the
    orchestrator+fedavg server averages each night's personalised exits). A user whose data
    cannot stream, or who fails on a day (UserDataError), is reported and the run goes on."""
    config = lifecycle.config
    streams, failures = {}, []
    for user in users:
        try:
            streams[user] = user_stream(population, user, config.stream, config.drift, config.seed)
        except UserDataError as exc:
            failures.append(dict(user=user, day=-1, policy="", error=one_line(exc)))
    states = {(policy, user): lifecycle.new_state() for policy in config.policies for user in streams}
    failed: set[tuple[str, str]] = set()
    average: dict[str, torch.Tensor] | None = None  # the server's exits for orchestrator+fedavg
    rows: list[dict] = []
    days = range(config.stream.days)
    if progress:
        from rich.progress import track

        days = track(days, description=f"lifecycle: {len(streams)} users x {len(config.policies)} policies")
    try:
        for day in days:
            average = _live_day(day, streams, states, lifecycle, average, failed, failures, rows)
    finally:
        lifecycle.load(None)  # leave the model with the shared exits
    columns = list(DayRecord.__dataclass_fields__)
    return LifecycleResult(
        timeline=pd.DataFrame(rows, columns=columns),
        failures=pd.DataFrame(failures, columns=["user", "day", "policy", "error"]),
        drift_days={user: stream.drift_day for user, stream in streams.items()},
    )


def _live_day(day, streams, states, lifecycle, average, failed, failures, rows):
    """Every user and policy lives `day`; returns the server's exits for the next day."""
    returned = []
    for user, stream in streams.items():
        inputs = stream.day(day)
        features = day_features(lifecycle, inputs)
        for policy in lifecycle.config.policies:
            if (policy, user) in failed:
                continue
            start = average if policy == "orchestrator+fedavg" else None
            try:
                outcome = run_day(policy, states[(policy, user)], lifecycle, inputs, start, features)
            except UserDataError as exc:
                failed.add((policy, user))
                failures.append(dict(user=user, day=day, policy=policy, error=one_line(exc)))
                continue
            rows.append(outcome.record.to_dict())
            if policy == "orchestrator+fedavg" and outcome.exits is not None:
                returned.append((outcome.exits, outcome.num_samples))
    return average_exits(returned) if returned else average


def accuracy_vs_samples(
    model,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    counts: Sequence[int],
    config: PersonalisationConfig | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """The paper's Fig. 4 for one user: accuracy of every exit on `test` after personalising the
    shared exits on the first n samples of a seeded order of `train`, for each n in `counts`
    (n = 0: the shared exits). Counts above the user's samples are skipped. The model's exits are
    restored afterwards. Rows: n_samples, exit (M = the final exit), accuracy."""
    config = config or PersonalisationConfig()
    x, y, labelled = train
    x_test, y_test = test
    shared = copy.deepcopy(model.exits.state_dict())
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test_features = FrozenFeatures(model, x_test)
    rows = []
    try:
        for n in counts:
            if n > len(x):
                continue
            model.exits.load_state_dict(shared)
            if n > 0:
                take = order[:n]
                personalise(model, x[take], y[take], labelled[take], replace(config, seed=seed))
            accuracies = exit_accuracies(test_features.exit_probabilities(), y_test)
            rows += [dict(n_samples=n, exit=k, accuracy=a) for k, a in enumerate(accuracies)]
    finally:
        model.exits.load_state_dict(shared)
    return pd.DataFrame(rows, columns=["n_samples", "exit", "accuracy"])
