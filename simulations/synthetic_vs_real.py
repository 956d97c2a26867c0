"""Does the synthetic default behave like real handwriting? The same statistics, side by side.

For each population (Hydra overrides separated by `--`): train (or reuse) the global model, run
the per-user protocol with the default personalisation on its held-out users in-process, and
report global accuracy on new users, the spread across users and the personalisation gain.

    python simulations/synthetic_vs_real.py --out results/synthetic_vs_real \\
        --population "synthetic" "" \\
        --population "real LEAF" "dataset=femnist_leaf dataset.path=../shared/data/femnist-leaf-sample"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from fedexits.errors import exits_2_on_bad_input
from fedexits.report import load_run
from fedexits.report.markdown import markdown_table
from fedexits.report.results import build_frames
from fedexits.study import compose_config, get_worker, initial_exits, prepare, run_users_in_process


def population_stats(
    per_user: pd.DataFrame, thresholds: pd.DataFrame, population: dict, training: dict
) -> dict:
    final_exit = per_user["exit"].max()
    wide = per_user.pivot_table(index=["user", "exit"], columns="stage", values="accuracy")
    final = wide.xs(final_exit, level="exit")["global"]
    early = wide[wide.index.get_level_values("exit") < final_exit]
    per_user_early = early.groupby(level="user").mean()
    gain = (per_user_early["personalised"] - per_user_early["global"]) * 100
    return {
        "users personalised": len(final),
        "global users": population["global_users"],
        "images per user (mean ± sd)": f"{population['images_per_user_mean']:.0f} ± "
        f"{population['images_per_user_sd']:.0f}",
        "global model, final exit on new users": f"{100 * final.mean():.1f}% ± {100 * final.std():.1f}",
        "global model, early exits on new users": f"{100 * per_user_early['global'].mean():.1f}% ± "
        f"{100 * per_user_early['global'].std():.1f}",
        "personalised early exits": f"{100 * per_user_early['personalised'].mean():.1f}% ± "
        f"{100 * per_user_early['personalised'].std():.1f}",
        "gain per user, early exits (pp)": f"{gain.mean():+.2f} (median {gain.median():+.2f})",
        "users helped / hurt (mean over early exits)": f"{(gain > 0).mean():.0%} / {(gain < 0).mean():.0%}",
        "speedup at 1 pp (FLOPs, mean)": f"{thresholds['speedup'].mean():.2f}x",
        "global training epochs": len(training["epoch_loss"]),
    }


@exits_2_on_bad_input
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--population",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "OVERRIDES"),
        help="run the protocol in-process on this population",
    )
    parser.add_argument(
        "--run",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "RUN_DIR"),
        help="read a finished `python -m fedexits.simulate` run instead",
    )
    parser.add_argument("--users", type=int, default=100, help="held-out users per population")
    parser.add_argument("--out", type=Path, default=Path("results/synthetic_vs_real"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    columns = {}
    for name, run_dir in args.run:
        run = load_run(run_dir)
        meta = run["summary"]["meta"]
        per_user = run["per_user"][run["per_user"]["init"] == "global"]
        thresholds = run["thresholds"][run["thresholds"]["init"] == "global"]
        columns[name] = population_stats(per_user, thresholds, meta["dataset"], meta["global_training"])
    for name, overrides in args.population:
        prepared = prepare(compose_config(overrides.split()))
        exits = initial_exits(prepared.plan, "global")
        users = prepared.users[: min(args.users, prepared.num_held_out)]
        get_worker.cache_clear()
        frames = build_frames(
            run_users_in_process(prepared.plan, users, exits, init=name), prepared.cost_table
        )
        frames["per_user"].to_csv(args.out / f"per_user_{name.replace(' ', '_')}.csv", index=False)
        columns[name] = population_stats(
            frames["per_user"], frames["thresholds"], prepared.population, prepared.training
        )
    table = pd.DataFrame(columns).rename_axis("statistic").reset_index()
    table.to_csv(args.out / "comparison.csv", index=False)
    text = markdown_table(table)
    (args.out / "comparison.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
