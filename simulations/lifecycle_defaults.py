"""Lifelong personalisation: measure the paper's Fig. 4 and choose the orchestrator's defaults.

    python simulations/lifecycle_defaults.py fig4 --users 20 --out results/lifecycle
    python simulations/lifecycle_defaults.py run --users 20 --out results/lifecycle
    python simulations/lifecycle_defaults.py sweep --users 20 --out results/lifecycle \
        --policies orchestrator --candidates '{"p=0.1": {"p_expl": 0.1}, "p=0.3": {"p_expl": 0.3}}'

`fig4`: accuracy of every exit against the number of personalisation samples (the
minimum-new-samples rule). `run`: every policy on the same users and streams, then the issue's
targets. `sweep`: orchestrator candidates (JSON of OrchestratorConfig overrides) on the same users
(`--policies orchestrator` to skip the others; compare with `run`'s nightly).
Everything runs in this process on one thread (what a virtual client gets), with the cached
global model of the given Hydra overrides (synthetic default without any).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from fedexits.data import build_population
from fedexits.data.streams import DriftConfig, StreamConfig
from fedexits.engine import ExitCosts, load_model
from fedexits.engine.lifecycle import Lifecycle
from fedexits.engine.lifecycle_config import POLICIES, LifecycleConfig
from fedexits.engine.lifecycle_run import accuracy_vs_samples, run_lifecycle
from fedexits.engine.orchestrator import OrchestratorConfig
from fedexits.engine.protocol import personalisation_for_user
from fedexits.fl.worker import personalisation_from_config

FIG4_COUNTS = [0, 10, 20, 30, 45, 60, 90, 120]


def prepare_model(overrides: list[str]) -> SimpleNamespace:
    """population, model, personalisation config, calibration settings, latency and seed of the
    run config of `overrides`: the one place to rewire when the study layer replaces simulate."""
    from fedexits.simulate import compose_config, prepare

    prepared = prepare(compose_config(overrides), progress=False)
    config = prepared.config
    model, _ = load_model(config["checkpoint"])
    personalisation, protocol = personalisation_from_config(config)
    calibration = dict(
        drop_tolerance_pp=protocol.drop_tolerance_pp,
        calibration_margin_z=protocol.calibration_margin_z,
        prune_exits=protocol.prune_exits,
    )
    latency = ExitCosts(config["latency"]["backbone"], config["latency"]["heads"])
    return SimpleNamespace(
        population=build_population(config["dataset"]),
        model=model,
        personalisation=personalisation,
        calibration=calibration,
        latency=latency,
        seed=config["seed"],
    )


def fig4(args, setup) -> pd.DataFrame:
    frames = []
    for user in setup.population.held_out_users[: args.users]:
        data = setup.population.load_user(user, seed=setup.seed)
        config = personalisation_for_user(setup.personalisation, setup.seed, user)
        train, test = (data.train_x, data.train_y, data.labelled), (data.test_x, data.test_y)
        curve = accuracy_vs_samples(setup.model, train, test, FIG4_COUNTS, config)
        frames.append(curve.assign(user=user))
    curve = pd.concat(frames)
    table = curve.pivot_table(index="n_samples", columns="exit", values="accuracy", aggfunc="mean")
    table["users"] = curve.groupby("n_samples")["user"].nunique()
    print((table * 100).round(1).assign(users=table["users"]).to_string())
    return curve


def target_metrics(timeline: pd.DataFrame, drift_days: dict, full_mflops: float) -> pd.DataFrame:
    """Per policy: the issue's targets (drifted users after their drift day; users without drift
    over the whole run). Accuracies are means over measured inputs (pp), costs per input."""
    t = timeline.assign(drift_day=timeline.user.map(drift_days))
    t["correct"] = t.accuracy * t.measured
    t["final_correct"] = t.final_accuracy * t.measured
    drifted = t[t.drift_day.notna() & (t.day >= t.drift_day)]
    steady = t[t.drift_day.isna()]
    rows = []
    for policy, group in t.groupby("policy", sort=False):
        row = {"policy": policy}
        per_user = drifted[drifted.policy == policy].groupby("user")
        d = per_user.agg({"correct": "sum", "final_correct": "sum", "measured": "sum", "mflops": "mean"})
        if len(d):
            gap = (d.final_correct - d.correct) / d.measured * 100
            row |= {
                "drifted_users": len(d),
                "drifted_gap_pp_mean": gap.mean(),
                "drifted_within_2pp": (gap <= 2).mean(),
                "drifted_flops_share": d.mflops.mean() / full_mflops,
            }
            delays = detection_delays(group, drift_days)
            row["median_delay_days"] = float(delays.median())
            row["flagged_within_2_days"] = float((delays <= 2).mean())
        s = steady[steady.policy == policy]
        if len(s):
            row |= {
                "steady_users": s.user.nunique(),
                "steady_accuracy": s.correct.sum() / s.measured.sum() * 100,
                "steady_final_accuracy": s.final_correct.sum() / s.measured.sum() * 100,
                "steady_flops_share": s.mflops.mean() / full_mflops,
                "steady_train_gflops_per_user": s.train_mflops.sum() / s.user.nunique() / 1e3,
                "steady_false_alarm_users": s.groupby("user").drift_flagged.any().mean(),
                "steady_personalisations_per_user": s.personalised.sum() / s.user.nunique(),
            }
        rows.append(row)
    return pd.DataFrame(rows).set_index("policy")


def detection_delays(timeline: pd.DataFrame, drift_days: dict) -> pd.Series:
    """Per drifted user of one policy's timeline: days from its drift to the first day it is
    flagged (0: the same day; inf: never)."""
    delays = {}
    for user, drift_day in drift_days.items():
        if drift_day is None or user not in set(timeline.user):
            continue
        own = timeline[(timeline.user == user) & (timeline.day >= drift_day) & timeline.drift_flagged]
        delays[user] = own.day.min() - drift_day if len(own) else np.inf
    return pd.Series(delays, dtype=float)


def lifecycle_config(args, policies, **orchestrator) -> LifecycleConfig:
    stream = StreamConfig(days=args.days, inputs_per_day=args.inputs_per_day)
    drift = DriftConfig(scenario=args.drift, share=args.share)
    return LifecycleConfig(
        policies=list(policies),
        seed=args.seed,
        stream=stream,
        drift=drift,
        orchestrator=OrchestratorConfig(**orchestrator),
    )


def run(args, setup, policies, orchestrator=None):
    config = lifecycle_config(args, policies, **(orchestrator or {}))
    population = setup.population
    decode = population.model_input
    lifecycle = Lifecycle(
        setup.model, config, setup.personalisation, decode, latency=setup.latency, **setup.calibration
    )
    started = time.perf_counter()
    result = run_lifecycle(population, population.held_out_users[: args.users], lifecycle, progress=True)
    seconds = time.perf_counter() - started
    metrics = target_metrics(result.timeline, result.drift_days, lifecycle.flops.full)
    return result, metrics, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["fig4", "run", "sweep"])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the global model, as for simulate")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--days", type=int, default=StreamConfig.days)
    parser.add_argument("--inputs-per-day", type=int, default=StreamConfig.inputs_per_day)
    parser.add_argument("--drift", default=DriftConfig.scenario)
    parser.add_argument("--share", type=float, default=DriftConfig.share)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", type=json.loads, default={"default": {}})
    parser.add_argument("--policies", type=lambda text: text.split(","), default=list(POLICIES))
    parser.add_argument("--out", default="results/lifecycle")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = prepare_model(args.overrides)
    pd.set_option("display.width", 200)
    if args.command == "fig4":
        fig4(args, setup).to_csv(out / "fig4.csv", index=False)
        return
    if args.command == "run":
        result, metrics, seconds = run(args, setup, args.policies)
        result.timeline.to_csv(out / "timeline.csv", index=False)
        result.failures.to_csv(out / "failures.csv", index=False)
        print(metrics.round(3).T.to_string())
        print(f"{args.users} users x {args.days} days x {len(args.policies)} policies: {seconds:.0f} s")
        return
    rows = []
    for name, change in args.candidates.items():
        _, metrics, seconds = run(args, setup, args.policies, change)
        for policy, row in metrics.iterrows():
            rows.append({"candidate": name, "policy": policy, **row.to_dict(), "seconds": seconds})
            print(json.dumps(rows[-1], default=float))
    table = pd.DataFrame(rows).set_index(["candidate", "policy"])
    table.to_csv(out / "sweep.csv")
    print(table.round(3).T.to_string())


if __name__ == "__main__":
    main()
