"""Lifelong personalisation: measure the paper's Fig. 4 and choose the orchestrator's defaults.

    python simulations/lifecycle_defaults.py fig4 --users 20 --out results/lifecycle
    python simulations/lifecycle_defaults.py run --users 20 --out results/lifecycle
    python simulations/lifecycle_defaults.py sweep --users 20 --out results/lifecycle --seed 0,1,2 \
        --policies orchestrator --candidates '{"p=0.1": {"p_expl": 0.1}, "p=0.3": {"p_expl": 0.3}}'

`fig4`: accuracy of every exit against the number of personalisation samples (the
minimum-new-samples rule). `run`: every policy on the same users and streams, then the issue's
targets. `sweep`: candidates (JSON of OrchestratorConfig overrides, or of the LifecycleConfig keys
in LIFECYCLE_KEYS, which change every policy) on the same users
(`--policies orchestrator` to skip the others), at every drift seed of `--seed`; per seed the
`--baselines` (default never and nightly) run once, and each candidate's row gets the
comparisons the targets need: its steady users against nightly's, its drifted FLOPs against
never's.
Everything runs in this process on one thread (what a virtual client gets), with the cached
global model of the given Hydra overrides (synthetic default without any).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

from fedexits.data import build_population
from fedexits.data.split import read_held_out_file
from fedexits.data.streams import DriftConfig, StreamConfig
from fedexits.engine import load_model
from fedexits.engine.lifecycle import Lifecycle
from fedexits.engine.lifecycle_config import POLICIES, LifecycleConfig
from fedexits.engine.lifecycle_run import accuracy_vs_samples, run_lifecycle
from fedexits.engine.orchestrator import OrchestratorConfig
from fedexits.errors import exits_2_on_bad_input
from fedexits.report.files import atomic_write_csv
from fedexits.report.lifecycle import target_metrics
from fedexits.study import compose_config
from fedexits.study.prepare import prepare
from fedexits.study.protocol import user_seed

FIG4_COUNTS = [0, 10, 20, 30, 45, 60, 90, 120]


def prepare_model(overrides: list[str]) -> SimpleNamespace:
    """population, model, personalisation config, calibration settings, latency and seed of the
    lifecycle run of `overrides` (the global model is trained once, then reused from the cache)."""
    settings = compose_config(["+experiment=lifecycle", *overrides])
    prepared = prepare(settings, progress=False)
    model, _ = load_model(prepared.plan.checkpoint)
    calibration = settings.calibration
    return SimpleNamespace(
        population=build_population(settings.dataset),
        model=model,
        settings=settings,
        personalisation=settings.personalisation.for_user(settings.seed),
        calibration=calibration,
        latency=prepared.plan.latency.costs() if prepared.plan.latency else None,
        seed=settings.seed,
    )


def chosen_users(args, setup) -> list[str]:
    """held_out_users[skip : skip + users] (tune on one slice, report on another), or the held-out
    users a --users-file lists (the LEAF reporting half)."""
    if args.users_file:
        listed = set(read_held_out_file(args.users_file))
        return [user for user in setup.population.held_out_users if user in listed]
    return setup.population.held_out_users[args.skip : args.skip + args.users]


def fig4(args, setup) -> pd.DataFrame:
    frames = []
    for user in chosen_users(args, setup):
        seed = user_seed(setup.seed, user)
        data = setup.population.load_user(user, seed=seed)
        config = setup.settings.personalisation.for_user(seed)
        train, test = (data.train_x, data.train_y, data.labelled), (data.test_x, data.test_y)
        curve = accuracy_vs_samples(setup.model, train, test, FIG4_COUNTS, config)
        frames.append(curve.assign(user=user))
    curve = pd.concat(frames)
    table = curve.pivot_table(index="n_samples", columns="exit", values="accuracy", aggfunc="mean")
    table["users"] = curve.groupby("n_samples")["user"].nunique()
    print((table * 100).round(1).assign(users=table["users"]).to_string())
    return curve


LIFECYCLE_KEYS = ("shared_threshold", "own_threshold", "buffer_size", "once_days")


def lifecycle_config(args, policies, **change) -> LifecycleConfig:
    """The run's settings; `change` holds OrchestratorConfig overrides and, for the keys in
    LIFECYCLE_KEYS, LifecycleConfig ones (these change every policy: run them all, no baselines)."""
    stream = StreamConfig(days=args.days, inputs_per_day=args.inputs_per_day)
    drift = DriftConfig(scenario=args.drift, share=args.share)
    outer = {key: change.pop(key) for key in LIFECYCLE_KEYS if key in change}
    return LifecycleConfig(
        policies=list(policies),
        seed=args.seed,
        stream=stream,
        drift=drift,
        orchestrator=OrchestratorConfig(**change),
        **outer,
    )


def run(args, setup, policies, orchestrator=None):
    config = lifecycle_config(args, policies, **dict(orchestrator or {}))
    population = setup.population
    decode = population.model_input
    lifecycle = Lifecycle(
        setup.model, config, setup.personalisation, decode, setup.calibration, setup.latency
    )
    started = time.perf_counter()
    result = run_lifecycle(population, chosen_users(args, setup), lifecycle, progress=True)
    seconds = time.perf_counter() - started
    metrics = target_metrics(result.timeline, result.drift_days, lifecycle.flops.full)
    return result, metrics, seconds


def against_baselines(row: pd.Series, baselines: pd.DataFrame) -> dict:
    """A candidate's targets relative to the baselines of the same seed: steady users against
    nightly (accuracy in pp, training compute as a share), drifted FLOPs of never."""
    out = {}
    if "nightly" in baselines.index:
        nightly = baselines.loc["nightly"]
        out["steady_vs_nightly_pp"] = 100 * (row.get("steady_accuracy") - nightly.get("steady_accuracy"))
        out["steady_compute_share_of_nightly"] = row.get("steady_train_gflops_per_user") / nightly.get(
            "steady_train_gflops_per_user"
        )
    if "never" in baselines.index:
        out["never_drifted_flops_share"] = baselines.loc["never"].get("drifted_flops_share")
    return out


def seeds(text: str) -> list[int]:
    return [int(seed) for seed in text.split(",")]


@exits_2_on_bad_input
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["fig4", "run", "sweep"])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the global model, as for simulate")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--skip", type=int, default=0, help="start at this held-out user (tuning vs report)")
    parser.add_argument("--users-file", help="run the held-out users this file lists (one per line)")
    parser.add_argument("--days", type=int, default=StreamConfig.days)
    parser.add_argument("--inputs-per-day", type=int, default=StreamConfig.inputs_per_day)
    parser.add_argument("--drift", default=DriftConfig.scenario)
    parser.add_argument("--share", type=float, default=DriftConfig.share)
    parser.add_argument("--seed", type=seeds, default=[0], help="drift seeds (sweep: a comma list)")
    parser.add_argument(
        "--baselines",
        type=lambda text: [p for p in text.split(",") if p],
        default=["never", "nightly"],
        help="sweep: policies run once per seed to compare candidates with ('' for none)",
    )
    parser.add_argument("--candidates", type=json.loads, default={"default": {}})
    parser.add_argument("--policies", type=lambda text: text.split(","), default=list(POLICIES))
    parser.add_argument("--out", default="results/lifecycle")
    args = parser.parse_intermixed_args()  # options anywhere among the Hydra overrides
    if args.command != "sweep":
        if len(args.seed) != 1:
            parser.error(f"--seed: {args.command} takes one drift seed, got {len(args.seed)}")
        args.seed = args.seed[0]
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
        metrics.to_csv(out / "targets.csv")
        print(metrics.round(3).T.to_string())
        users = result.timeline.user.nunique()
        print(f"{users} users x {args.days} days x {len(args.policies)} policies: {seconds:.0f} s")
        return
    rows = []
    for seed in args.seed:
        at_seed = argparse.Namespace(**{**vars(args), "seed": seed})
        baselines = run(at_seed, setup, args.baselines)[1] if args.baselines else None
        for name, change in args.candidates.items():
            _, metrics, seconds = run(at_seed, setup, args.policies, change)
            # the candidate's own never / nightly where it ran them (they see its settings)
            reference = (
                metrics
                if baselines is None
                else pd.concat([metrics, baselines.drop(metrics.index, errors="ignore")])
            )
            for policy, row in metrics.iterrows():
                rows.append({"drift_seed": seed, "candidate": name, "policy": policy, **row.to_dict()})
                rows[-1] |= {**against_baselines(row, reference), "seconds": seconds}
                print(json.dumps(rows[-1], default=float))
            atomic_write_csv(pd.DataFrame(rows), out / "sweep.csv")  # a crash keeps what finished
    table = pd.DataFrame(rows).set_index(["drift_seed", "candidate", "policy"])
    print(table.round(3).T.to_string())


if __name__ == "__main__":
    sys.exit(main())
