"""The feature-shift rule's two-sample tests on real images, without the lifecycle around them.

    python simulations/shift_test_power.py --users 20 --csv results/lifecycle/shift_test_power_synthetic.csv
    python simulations/shift_test_power.py dataset=femnist_leaf dataset.path=... \
        dataset.held_out_file=simulations/leaf_held_out.txt dataset.n_test=60 global_training.epochs=15 \
        --users-file simulations/leaf_tuning.txt --csv results/lifecycle/shift_test_power_leaf.csv

For each user: a reference of m of its images (the calibration samples), then windows of 20
images, of the same user (no shift: how wide z spreads) or of each other user (a writer drift:
how often z stands out). Per test, reference size and exit: z's mean, deviation and largest value
without a shift, and the share of writer pairs whose z passes the 99th percentile of the same
test's no-shift z (power at a matched false-alarm rate), written to `--csv`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lifecycle_defaults import chosen_users, prepare_model

from fedexits.engine.features import FrozenFeatures
from fedexits.engine.shift_tests import diagonal_z, hotelling_z, reference_summary
from fedexits.errors import exits_2_on_bad_input
from fedexits.report.files import atomic_write_csv
from fedexits.study.protocol import user_seed

WINDOW = 20


def z_scores(reference: np.ndarray, window: np.ndarray) -> dict[str, float]:
    m = len(reference)
    mean, sd, dof, covariance = reference_summary(reference, covariance=True)
    return {
        "diagonal": diagonal_z(window, mean, sd, dof, m),
        "hotelling": hotelling_z(window, mean, covariance, m),
    }


def trials(features: dict[str, np.ndarray], m: int, repeats: int, rng) -> pd.DataFrame:
    rows = []
    for user, own in features.items():
        if len(own) < m + WINDOW:
            continue
        for repeat in range(repeats):
            order = rng.permutation(len(own))
            reference, rest = own[order[:m]], own[order[m:]]
            same = rest[rng.choice(len(rest), WINDOW, replace=False)]
            rows.append({"shift": False, **z_scores(reference, same)})
            for other, theirs in features.items():
                if other != user and repeat < 2:
                    window = theirs[rng.choice(len(theirs), WINDOW, replace=False)]
                    rows.append({"shift": True, **z_scores(reference, window)})
    return pd.DataFrame(rows)


@exits_2_on_bad_input
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the global model, as for simulate")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--skip", type=int, default=0)
    parser.add_argument("--users-file", help="the held-out users this file lists (one per line)")
    parser.add_argument("--references", default="10,18,30,60,120", help="reference sizes m (comma list)")
    parser.add_argument("--exits", default="0,1", help="exit indices whose features are tested")
    parser.add_argument("--repeats", type=int, default=10, help="no-shift windows per user and m")
    parser.add_argument(
        "--csv", default="results/lifecycle/shift_test_power.csv", help="where the table goes"
    )
    args = parser.parse_intermixed_args()
    torch.set_num_threads(1)
    setup = prepare_model(args.overrides)
    rows = []
    for exit_index in [int(e) for e in args.exits.split(",")]:
        features = {}
        for user in chosen_users(args, setup):
            data = setup.population.load_user(user, seed=user_seed(setup.seed, user))
            images = torch.cat([data.train_x, data.test_x])
            features[user] = (
                FrozenFeatures(setup.model, images, cache=False).pooled(exit_index).double().numpy()
            )
        for m in [int(v) for v in args.references.split(",")]:
            table = trials(features, m, args.repeats, np.random.default_rng(m))
            for test in ("diagonal", "hotelling"):
                null, shifted = table.loc[~table["shift"], test], table.loc[table["shift"], test]
                q99 = float(null.quantile(0.99))
                rows.append(
                    {
                        "exit": exit_index,
                        "reference": m,
                        "test": test,
                        "no_shift_windows": len(null),
                        "no_shift_mean": null.mean(),
                        "no_shift_sd": null.std(),
                        "no_shift_max": null.max(),
                        "no_shift_q99": q99,
                        "writer_pairs": len(shifted),
                        "writer_median_z": shifted.median(),
                        "power_at_q99": float((shifted > q99).mean()),
                    }
                )
                print(pd.DataFrame(rows[-1:]).round(3).to_string(index=False, header=len(rows) == 1))
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(pd.DataFrame(rows), Path(args.csv))


if __name__ == "__main__":
    sys.exit(main())
