"""Which federated budget brings the federated exits within 2 pp of the centrally trained exits?

Every candidate (strategy, rounds, clients per round, local epochs, learning rate) trains exits
through Flower's simulation engine, all in one session (each client process keeps its frozen
features across candidates). Its exits are then scored as `init=compare` scores them before
personalisation: mean over the held-out users of the early exits' accuracy on their test images,
against the centrally trained exits on the same images. Writes `budget.csv` and `budget.md` (one
row per candidate: accuracy, gap, samples processed, training TFLOPs, seconds) and each
candidate's curve on the evaluation clients (`curve_<n>.csv`).

    python simulations/federated_budget.py --out results/budget [overrides ...] \\
        --candidate "federated.rounds=20 federated.local_epochs=5 federated.lr=0.05" --candidate ...

Without --candidate a default grid runs (see CANDIDATES).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from fedexits.engine import load_model
from fedexits.engine.features import FrozenFeatures
from fedexits.engine.inference import exit_accuracies
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
    run's *early exits before* reports), with the features computed once."""

    def __init__(self, prepared):
        plan = prepared.plan
        settings = plan.settings
        self.model, _ = load_model(plan.checkpoint)
        from fedexits.data import build_population

        population = build_population(settings.dataset)
        chosen = sample_users(prepared.num_held_out, settings.simulation.num_users, settings.seed)
        self.users = []
        for partition in chosen:
            user = prepared.users[partition]
            data = population.load_user(user, seed=user_seed(settings.seed, user))
            self.users.append((FrozenFeatures(self.model, data.test_x), data.test_y))

    def __call__(self, exits: dict[str, torch.Tensor]) -> float:
        self.model.exits.load_state_dict(exits)
        per_user = [exit_accuracies(f.exit_probabilities(), y)[:-1] for f, y in self.users]
        return float(sum(sum(a) / len(a) for a in per_user) / len(per_user))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every candidate")
    parser.add_argument("--candidate", action="append", help="federated overrides of one candidate")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    candidates = args.candidate or CANDIDATES
    base = ["init=federated", *args.overrides]
    settings = [compose_config([*base, *c.split()]) for c in candidates]  # every candidate checked first
    started = time.perf_counter()
    prepared = prepare(settings[0], progress=False)
    for s in settings:
        s.federated.check_population(len(prepared.users) - prepared.num_held_out)
    score = HeldOutScore(prepared)
    central = score(initial_exits(prepared.plan, "global"))
    elapsed = time.perf_counter() - started
    print(f"central exits on {len(score.users)} held-out users: {central:.2%} ({elapsed:.0f} s)")

    def work(grid, node_of):
        rows = []
        for index, (candidate, s) in enumerate(zip(candidates, settings)):
            variant = replace(prepared, plan=replace(prepared.plan, settings=s))
            began = time.perf_counter()
            exits, history = federated_exits(grid, variant, node_of)
            seconds = time.perf_counter() - began
            accuracy = score(exits)
            curve = federated_frame(history, prepared.flops_per_image)
            atomic_write_csv(curve, args.out / f"curve_{index}.csv")
            budget = budget_table(s, prepared.training, prepared.flops_per_image, history).set_index("init")
            row = {
                "candidate": candidate,
                "held_out_accuracy": accuracy,
                "gap_pp": 100 * (accuracy - central),
                "eval_clients_accuracy": curve["accuracy_early_exits"].dropna().iloc[-1],
                "samples": int(budget.loc["federated", "samples"]),
                "tflops": float(budget.loc["federated", "tflops"]),
                "features_cached": int(curve["features_cached"].sum()),
                "participations": int(curve["clients_ok"].sum()),
                "seconds": seconds,
            }
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            rows.append(row)
            atomic_write_csv(pd.DataFrame(rows), args.out / "budget.csv")
        return rows

    rows = pd.DataFrame(run_with_clients(prepared, work))
    central_budget = budget_table(
        replace(settings[0], init=replace(settings[0].init, inits=["global"])),
        prepared.training,
        prepared.flops_per_image,
        None,
    ).iloc[0]
    text = [
        f"Central exits (global model): {central:.2%} mean early-exit accuracy before personalisation on "
        f"{len(score.users)} held-out users; {central_budget['samples']} samples, "
        f"{central_budget['tflops']:.2f} training TFLOPs ({central_budget['trained']}).",
        "",
        markdown_table(
            rows,
            formats={
                "held_out_accuracy": lambda v: f"{100 * v:.1f}%",
                "eval_clients_accuracy": lambda v: f"{100 * v:.1f}%",
                "gap_pp": lambda v: f"{v:+.2f}",
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
    main()
