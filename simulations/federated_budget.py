"""Which federated budget brings the federated exits within 2 pp of the centrally trained exits?

Every candidate (strategy, clients per round, local epochs, learning rate; its `rounds` is the
most it may take) trains exits through Flower's simulation engine, all candidates in one session
(each client process keeps its frozen features across candidates). Every `--score-every` rounds
Flower's server-side evaluation scores the exits as `init=compare` scores them before
personalisation: the mean over held-out users of the early exits' accuracy on their test
images, against the centrally trained exits on the same images. The held-out users are split in
two: the tuning users choose the budget, the reporting users report it (given as files, e.g.
simulations/leaf_tuning.txt and leaf_reporting.txt, or a seeded half each). Writes `curves.csv`
(candidate x scored round: accuracy and gap on both halves, samples processed, training TFLOPs,
seconds) and `budget.md` (per candidate: the first scored round within 2 pp of central on the
tuning users, what it cost, and the reporting users' numbers at that round).

    python simulations/federated_budget.py --out results/budget [overrides ...] \\
        --candidate "federated.rounds=40 federated.local_epochs=5 federated.lr=0.05" --candidate ...

Without --candidate a default grid runs (see CANDIDATES).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from flwr.app import MetricRecord

from fedexits.data import build_population
from fedexits.data.split import read_held_out_file, rng_for
from fedexits.engine import load_model
from fedexits.engine.features import FrozenFeatures
from fedexits.engine.inference import exit_accuracies
from fedexits.errors import exits_2_on_bad_input
from fedexits.fl.runtime import run_with_clients
from fedexits.fl.server_app import federated_exits
from fedexits.report.files import atomic_write_csv, atomic_write_text
from fedexits.report.markdown import markdown_table
from fedexits.study import compose_config, initial_exits, prepare, sample_users, user_seed
from fedexits.study.budget import budget_table, federated_frame

CANDIDATES = [
    "federated.rounds=10 federated.clients_per_round=10 federated.local_epochs=1 federated.lr=0.01",
    "federated.rounds=20 federated.clients_per_round=20 federated.local_epochs=5 federated.lr=0.05",
    "federated.rounds=20 federated.clients_per_round=20 federated.local_epochs=5 federated.lr=0.05 "
    "federated/strategy=fedadam federated.strategy.server_lr=0.01",
]


class HeldOutScore:
    """Mean over held-out users of the early exits' accuracy on their test images (what the
    run's *early exits before* reports), with the features computed once, separately for the
    tuning users (which choose the budget) and the reporting users (which report it)."""

    def __init__(self, prepared, tuning_file: str | None = None, reporting_file: str | None = None):
        plan = prepared.plan
        settings = plan.settings
        self.model, _ = load_model(plan.checkpoint)
        population = build_population(settings.dataset)
        chosen = sample_users(prepared.num_held_out, settings.simulation.num_users, settings.seed)
        users = [prepared.users[partition] for partition in chosen]
        self.groups = split_users(users, settings.seed, tuning_file, reporting_file)
        self.features = {}
        for user in users:
            data = population.load_user(user, seed=user_seed(settings.seed, user))
            self.features[user] = (FrozenFeatures(self.model, data.test_x), data.test_y)

    def __call__(self, exits: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.exits.load_state_dict(exits)
        scores = {}
        for group, users in self.groups.items():
            per_user = []
            for user in users:
                features, labels = self.features[user]
                accuracies = exit_accuracies(features.exit_probabilities(), labels)[:-1]
                per_user.append(sum(accuracies) / len(accuracies))
            scores[group] = float(sum(per_user) / len(per_user))
        return scores


def split_users(
    users: list[str], seed: int, tuning_file: str | None, reporting_file: str | None
) -> dict[str, list[str]]:
    """Tuning and reporting users among the held-out `users`: from the given files (each must
    list held-out users), or a seeded half each."""
    if tuning_file and reporting_file:
        groups = {"tuning": read_held_out_file(tuning_file), "reporting": read_held_out_file(reporting_file)}
        for group, listed in groups.items():
            missing = sorted(set(listed) - set(users))
            if missing:
                raise SystemExit(f"--{group}: {len(missing)} user(s) are not held out, e.g. {missing[0]}")
        return groups
    order = rng_for("federated budget tuning split", seed).permutation(len(users))
    half = len(users) // 2
    return {
        "tuning": sorted(users[i] for i in order[:half]),
        "reporting": sorted(users[i] for i in order[half:]),
    }


@exits_2_on_bad_input
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every candidate")
    parser.add_argument("--candidate", action="append", help="federated overrides of one candidate")
    parser.add_argument("--score-every", type=int, default=5, help="rounds between held-out scores")
    parser.add_argument("--target-pp", type=float, default=2.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tuning", help="held-out users that choose the budget (one id a line)")
    parser.add_argument("--reporting", help="held-out users that report it (one id a line)")
    args = parser.parse_intermixed_args()  # options anywhere among the Hydra overrides
    candidates = args.candidate or CANDIDATES
    base = ["init=federated", *args.overrides]
    settings = [compose_config([*base, *c.split()]) for c in candidates]  # every candidate checked first
    started = time.perf_counter()
    prepared = prepare(settings[0], progress=False)
    for s in settings:
        s.federated.check_population(len(prepared.users) - prepared.num_held_out)
    score = HeldOutScore(prepared, args.tuning, args.reporting)
    central = score(initial_exits(prepared.plan, "global"))
    elapsed = time.perf_counter() - started
    sizes = {group: len(users) for group, users in score.groups.items()}
    print(f"central exits {central} on {sizes} held-out users ({elapsed:.0f} s)", flush=True)
    rows: list[dict] = []

    def work(grid, node_of):
        for index, (candidate, s) in enumerate(zip(candidates, settings)):
            variant = replace(prepared, plan=replace(prepared.plan, settings=s))
            clock = {"start": time.perf_counter()}

            def evaluate_fn(server_round, arrays, s=s, clock=clock):
                clock[server_round] = time.perf_counter() - clock["start"]  # after the round's training
                if server_round % args.score_every and server_round != s.federated.rounds:
                    return None
                return MetricRecord(score(arrays.to_torch_state_dict()))

            _, history = federated_exits(grid, variant, node_of, evaluate_fn=evaluate_fn)
            curve = federated_frame(history, prepared.flops_per_image).set_index("round")
            for server_round, metrics in history["server_evaluations"].items():
                tuning, reporting = float(metrics["tuning"]), float(metrics["reporting"])
                rows.append(
                    {
                        "candidate": index,
                        "overrides": candidate,
                        "round": server_round,
                        "tuning_accuracy": tuning,
                        "gap_pp": 100 * (tuning - central["tuning"]),
                        "reporting_accuracy": reporting,
                        "reporting_gap_pp": 100 * (reporting - central["reporting"]),
                        "eval_clients_accuracy": curve.loc[server_round, "accuracy_early_exits"],
                        "samples": int(curve.loc[server_round, "samples_cumulative"]),
                        "tflops": float(curve.loc[server_round, "tflops_cumulative"]),
                        "features_cached": int(curve.loc[:server_round, "features_cached"].sum()),
                        "participations": int(curve.loc[:server_round, "clients_ok"].sum()),
                        "seconds": clock.get(server_round, 0.0),
                    }
                )
                print(
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True
                )
            atomic_write_csv(pd.DataFrame(rows), args.out / "curves.csv")

    run_with_clients(prepared, work)
    curves = pd.DataFrame(rows)
    best = []
    for _, group in curves.groupby("candidate"):
        within = group[group["gap_pp"] >= -args.target_pp]
        chosen = within.iloc[0] if len(within) else group.iloc[group["tuning_accuracy"].argmax()]
        best.append({**chosen.to_dict(), "within_target": bool(len(within))})
    central_row = budget_table(
        replace(settings[0], init=replace(settings[0].init, inits=["global"])),
        prepared.training,
        prepared.flops_per_image,
        None,
    ).iloc[0]
    text = [
        f"Central exits (global model), mean early-exit accuracy before personalisation: "
        f"{central['tuning']:.2%} on {sizes['tuning']} tuning users, {central['reporting']:.2%} on "
        f"{sizes['reporting']} reporting users; {central_row['samples']} samples, "
        f"{central_row['tflops']:.2f} training TFLOPs ({central_row['trained']}).",
        "",
        f"Per candidate: the first scored round within {args.target_pp:g} pp of central on the tuning "
        "users (or its best round there), and the same round on the reporting users.",
        "",
        markdown_table(
            pd.DataFrame(best),
            columns={
                "overrides": "candidate",
                "round": "round",
                "within_target": f"within {args.target_pp:g} pp",
                "tuning_accuracy": "tuning, before",
                "gap_pp": "tuning gap (pp)",
                "reporting_accuracy": "reporting, before",
                "reporting_gap_pp": "reporting gap (pp)",
                "samples": "samples",
                "tflops": "TFLOPs",
                "seconds": "seconds",
            },
            formats={
                "tuning_accuracy": lambda v: f"{100 * v:.1f}%",
                "gap_pp": lambda v: f"{v:+.2f}",
                "reporting_accuracy": lambda v: f"{100 * v:.1f}%",
                "reporting_gap_pp": lambda v: f"{v:+.2f}",
                "tflops": lambda v: f"{v:.2f}",
                "seconds": lambda v: f"{v:.0f}",
            },
        ),
        "",
        f"Overrides: `{' '.join(args.overrides)}`; total {time.perf_counter() - started:.0f} s.",
    ]
    atomic_write_text(args.out / "budget.md", "\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    sys.exit(main())
