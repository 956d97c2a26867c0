"""The seed paper's comparison: data-aware vs data-agnostic pruning + retraining per user.

Rajagopal & Bouganis (CVPRW'20, arXiv 2006.08554) report that pruning with the user's data and
retraining gains on average +10.2 pp (up to +42.0 pp) over pruning and retraining that ignore it.
Here, on label-skewed synthetic users and a global model trained by `engine.train_global`, every
held-out user's copy of the network is pruned at each level (share of FLOPs removed) by:

- `agnostic`: filter L1 norm of the shared weights (`prune_agnostic`);
- `taylor`: first-order Taylor importance on the user's data (`prune_data`, the default);
- `seed`: the seed's own procedure, fine-tune on the user's data, then L1 (`prune_data`,
  prune_importance="finetuned_magnitude"; the fine-tuning epochs come out of the same budget);

then retrained on the user's data with the same budget, and tested on the user's test images.
All three give the same architecture at a level, so only the kept channels differ. Writes
per_user.csv, summary.csv and summary.md into --out and prints the table.

    FEDEXITS_CACHE_DIR=/work/cache/prune nice -n 10 python simulations/pruning_comparison.py \
        --users 20 --out results/pruning_comparison
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from fedexits.atomic import atomic_write
from fedexits.data import build_population
from fedexits.data.split import stable_seed
from fedexits.engine import PersonalisationConfig, PruningConfig, TrainConfig, prune_sweep, train_global
from fedexits.engine.pruning import final_network, predict
from fedexits.errors import exits_2_on_bad_input
from fedexits.models import MultiExitSpec, build_multi_exit

METHODS = {
    "agnostic": ("prune_agnostic", PruningConfig()),
    "taylor": ("prune_data", PruningConfig(prune_importance="taylor")),
    "seed": ("prune_data", PruningConfig(prune_importance="finetuned_magnitude")),
}
SEED_PAPER_GAIN_PP = 10.2


def prepare_model(args):
    """The global model and its population: the one place the study layer would replace.
    Trained once by `engine.train_global` and cached (resumed or reused on a rerun)."""
    cache = Path(os.environ.get("FEDEXITS_CACHE_DIR", "~/.cache/fedexits")).expanduser()
    data = {
        "source": "synthetic",
        "cache_dir": str(cache / "data"),
        "seed": args.seed,
        "num_writers": args.writers,
        "num_held_out": args.held_out,
        "label_skew": 5.0,
        "style_strength": 1.5,
    }
    population = build_population(data)
    spec = MultiExitSpec(
        num_classes=population.num_classes, input_shape=tuple(population.input_shape), width_mult=args.width
    )
    training = TrainConfig(epochs=args.global_epochs, batch_size=128, lr=0.1, seed=args.seed)
    key = json.dumps([data, spec.architecture(), repr(training)], sort_keys=True)
    path = cache / "models" / f"pruning-comparison-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    model = build_multi_exit(spec)
    train_global(model, population.global_train_set(), training, path, extra={"dataset": data})
    return model.eval(), population


def accuracy(network, x, y) -> float:
    return (predict(network, x).argmax(1) == y).double().mean().item()


def run_user(model, population, user: str, args) -> list[dict]:
    data = population.load_user(user, seed=stable_seed(args.seed, user))
    config = PersonalisationConfig(epochs=args.epochs, seed=stable_seed(args.seed, "pruning", user))
    common = dict(user=user, n_train=data.n_train, n_test=data.n_test)
    rows = [
        dict(
            common,
            method="unpruned",
            level=0.0,
            accuracy=accuracy(final_network(model), data.test_x, data.test_y),
        )
    ]
    for name, (method, pruning) in METHODS.items():
        pruning = replace(pruning, prune_retrain_lr=args.lr)
        results = prune_sweep(
            model, data.train_x, data.train_y, data.labelled, config, pruning, method, args.levels
        )
        for result in results:
            rows.append(
                dict(
                    common,
                    method=name,
                    level=result.prune_flops_fraction,
                    accuracy=accuracy(result.network, data.test_x, data.test_y),
                    flops_removed=result.flops_removed,
                    mflops=result.mflops,
                    params=result.params,
                    seconds=result.seconds,
                    final_loss=result.epoch_losses[-1] if result.epoch_losses else float("nan"),
                )
            )
    return rows


def summarise(per_user: pd.DataFrame) -> pd.DataFrame:
    wide = per_user.pivot_table(index=["user", "level"], columns="method", values="accuracy") * 100
    unpruned = per_user[per_user["method"] == "unpruned"].set_index("user")["accuracy"] * 100
    rows = []
    for level, group in wide.drop(index=0.0, level="level", errors="ignore").groupby(level="level"):
        row = {"level": level, "unpruned %": unpruned.mean()}
        for method in METHODS:
            row[f"{method} %"] = group[method].mean()
        for method in ("taylor", "seed"):
            gain = group[method] - group["agnostic"]
            row[f"{method} - agnostic pp"] = gain.mean()
            row[f"{method} gain median"] = gain.median()
            row[f"{method} gain sd"] = gain.std()
            row[f"{method} gain min..max"] = f"{gain.min():+.1f}..{gain.max():+.1f}"
            row[f"{method} wins share"] = (gain > 0).mean()
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    cells = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in table.to_numpy()]
    lines = [list(table.columns), ["---"] * len(table.columns), *cells]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


@exits_2_on_bad_input
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/pruning_comparison"))
    parser.add_argument("--users", type=int, default=20, help="held-out users to prune for")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--writers", type=int, default=100)
    parser.add_argument("--held-out", type=int, default=20)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--global-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="retraining budget (personalisation.epochs)")
    parser.add_argument("--lr", type=float, default=None, help="retraining lr (default: personalisation.lr)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, population = prepare_model(args)
    prepared_s = time.perf_counter() - started
    rows = []
    for k, user in enumerate(population.held_out_users[: args.users]):
        rows += run_user(model, population, user, args)
        print(f"user {k + 1}/{args.users} {user}: {time.perf_counter() - started:.0f} s", flush=True)
    per_user = pd.DataFrame(rows)
    summary = summarise(per_user)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "per_user.csv", lambda f: per_user.to_csv(f, index=False), "w")
    atomic_write(args.out / "summary.csv", lambda f: summary.to_csv(f, index=False), "w")
    settings = {k: str(v) for k, v in vars(args).items()}
    text = (
        f"{markdown(summary)}\n\nseed paper: +{SEED_PAPER_GAIN_PP} pp\n"
        f"settings: {json.dumps(settings)}\nprepare {prepared_s:.0f} s, "
        f"total {time.perf_counter() - started:.0f} s\n"
    )
    atomic_write(args.out / "summary.md", lambda f: f.write(text), "w")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
