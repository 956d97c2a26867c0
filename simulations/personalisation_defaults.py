"""Which personalisation settings help on real data? (issue: "Defaults come from measurement")

Trains (or reuses) the global model of a population, then personalises every held-out user
in-process with each candidate setting and prints, per setting, the mean early-exit accuracy
before/after, the share of users hurt and how often the guard fired.

    python simulations/personalisation_defaults.py \
        dataset=femnist_leaf dataset.path=../shared/data/femnist-leaf-sample --out results/defaults
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from fedexits.errors import exits_2_on_bad_input
from fedexits.report.results import build_frames
from fedexits.study import compose_config, get_worker, initial_exits, prepare, run_users_in_process

CANDIDATES = {
    "paper (sgd lr=0.01, no guard)": {"lr": 0.01, "guard": False},
    "sgd lr=0.001, no guard": {"lr": 0.001, "guard": False},
    "sgd lr=0.01 + guard": {"lr": 0.01, "guard": True},
    "sgd lr=0.001 + guard": {"lr": 0.001, "guard": True},
    "sgd lr=0.003 + guard": {"lr": 0.003, "guard": True},
}


def summarise(per_user: pd.DataFrame) -> dict:
    early = per_user[per_user["exit"] < per_user["exit"].max()]
    wide = early.pivot_table(index=["user", "exit"], columns="stage", values="accuracy")
    gain = (wide["personalised"] - wide["global"]) * 100
    by_exit = gain.groupby(level="exit")
    guard = pd.to_numeric(early[early["stage"] == "personalised"]["guard_fired"], errors="coerce")
    return {
        "mean_gain_pp": gain.mean(),
        "gain_pp_per_exit": by_exit.mean().round(2).tolist(),
        "hurt_share_exit0": float((gain.xs(0, level="exit") < 0).mean()),
        "hurt_share_all": float((gain < 0).mean()),
        "helped_share_all": float((gain > 0).mean()),
        "guard_fired_share": float(guard.mean()) if guard.notna().any() else None,
        "before_mean": float(wide["global"].mean()),
        "after_mean": float(wide["personalised"].mean()),
    }


@exits_2_on_bad_input
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedexits.simulate")
    parser.add_argument("--out", default="results/personalisation_defaults")
    parser.add_argument(
        "--candidates",
        type=json.loads,
        default=CANDIDATES,
        help='JSON {"name": {setting: value}} replacing the built-in candidates',
    )
    args = parser.parse_intermixed_args()  # options anywhere among the Hydra overrides
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare(compose_config(args.overrides))
    exits = initial_exits(prepared.plan, "global")
    held_out = prepared.users[: prepared.num_held_out]
    rows = []
    for name, change in args.candidates.items():
        settings = prepared.plan.settings
        settings = replace(settings, personalisation=replace(settings.personalisation, **change))
        plan = replace(prepared.plan, settings=settings)
        get_worker.cache_clear()
        started = time.perf_counter()
        records = run_users_in_process(plan, held_out, exits, init=name)
        frames = build_frames(records, prepared.cost_table)
        slug = "".join(c if c.isalnum() else "_" for c in name)
        frames["per_user"].to_csv(out / f"per_user_{slug}.csv", index=False)
        row = {
            "setting": name,
            **summarise(frames["per_user"]),
            "seconds": time.perf_counter() - started,
            "users": len(held_out),
            "failed": len(frames["failures"]),
        }
        rows.append(row)
        print(json.dumps(row, default=float))
    table = pd.DataFrame(rows)
    table.to_csv(out / "summary.csv", index=False)
    print(table.drop(columns=["gain_pp_per_exit"]).round(3).to_string(index=False))


if __name__ == "__main__":
    sys.exit(main())
