"""Which calibration rule and guard keep their promises on users nobody tuned on? (issue 9)

Every held-out user is personalised once per route and the exits' outputs are cached:
  - "val": today's protocol: the exits train on 80% of the personalisation images; guard and
    threshold are decided on the other 20%;
  - "oof": out-of-fold: 5 fold models give outputs on every personalisation image for the guard
    and the threshold; the deployed exits train on all of them.
Then every candidate (route x guard x calibration rule) is evaluated from the cache on the
TUNING half of the users, the candidate with a stated guarantee (rule ltt) that meets the most
targets there, then with the largest FLOP speedup, is chosen, and every candidate is reported
on the REPORTING half with the chosen one marked: its numbers were not tuned on those users.
Halves: `tuning_reporting_split` (seeded), recorded next to the held-out list.

    python simulations/calibration_rules.py --out results/calibration_rules \\
        --tuning simulations/leaf_tuning.txt --reporting simulations/leaf_reporting.txt -- \\
        dataset=femnist_leaf dataset.path=../shared/data/femnist-leaf-sample \\
        dataset.held_out_file=simulations/leaf_held_out.txt dataset.n_test=60 global_training.epochs=15
    python simulations/calibration_rules.py --write-split simulations/leaf_held_out.txt --seed 0
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch

from fedexits.atomic import atomic_write
from fedexits.data.split import read_held_out_file, tuning_reporting_split, write_user_list
from fedexits.engine import (
    LTT_THRESHOLDS,
    THRESHOLDS,
    CalibrationConfig,
    PersonalisationConfig,
    apply_calibration,
    calibrate,
    personalise,
)
from fedexits.engine.features import FrozenFeatures
from fedexits.engine.out_of_fold import OutOfFoldConfig, guard_decisions, personalise_out_of_fold
from fedexits.engine.personalise import GUARD_METRICS, split_validation
from fedexits.errors import exits_2_on_bad_input

TARGETS = {
    "mean_drop_pp": 1.0,
    "users_drop_over_2pp": 0.10,
    "speedup": 3.0,
    "pairs_hurt": 0.10,
    "gain_pp": 1.0,
}
# Every candidate spells out its tolerance and grid, so the names keep their meaning whatever the
# defaults are. LTT_THRESHOLDS: the grid topped at 0.8 (see engine/calibration.py).
FULL = dict(thresholds=THRESHOLDS, drop_tolerance_pp=1.0)
TOP_08 = LTT_THRESHOLDS
RULES = {  # the promise of "ltt" is stated (tolerance, confidence); margin/plain are heuristics
    "plain": CalibrationConfig(rule="plain", **FULL),
    "margin z=0.5": CalibrationConfig(rule="margin", margin_z=0.5, **FULL),
    "margin z=1": CalibrationConfig(rule="margin", margin_z=1.0, **FULL),
    "margin z=2": CalibrationConfig(rule="margin", margin_z=2.0, **FULL),
    "ltt 1pp@90%": CalibrationConfig(rule="ltt", confidence=0.9, **FULL),
    "ltt 1pp@90% top 0.8": CalibrationConfig(
        rule="ltt", confidence=0.9, drop_tolerance_pp=1.0, thresholds=TOP_08
    ),
    "ltt 1pp@80%": CalibrationConfig(rule="ltt", confidence=0.8, **FULL),
    "ltt 2pp@90%": CalibrationConfig(
        rule="ltt", confidence=0.9, drop_tolerance_pp=2.0, thresholds=THRESHOLDS
    ),
    "ltt 2pp@90% top 0.8": CalibrationConfig(
        rule="ltt", confidence=0.9, drop_tolerance_pp=2.0, thresholds=TOP_08
    ),
}
GUARDS = {  # name -> (test, confidence); "point" is today's guard rule
    "point": ("point", 0.5),
    "paired 80%": ("paired", 0.8),
    "paired 90%": ("paired", 0.9),
}


@dataclass
class Study:
    """What the experiment needs from the layers above the engine."""

    model: torch.nn.Module
    cost_table: pd.DataFrame
    users: list[str]
    load: object  # user -> (x, y, labelled, x_test, y_test)
    personalisation: object  # user -> PersonalisationConfig (per-user seed)


def prepare_study(overrides: list[str], checkpoint: str | None = None) -> Study:
    """Global model and held-out users through the study layer. `checkpoint`: use this global
    model instead of training (or reusing) the one the overrides describe."""
    from fedexits.data import build_population
    from fedexits.engine import load_model
    from fedexits.models import cost_table
    from fedexits.study.config import compose_config
    from fedexits.study.prepare import prepare
    from fedexits.study.protocol import user_seed

    settings = compose_config(overrides)
    if checkpoint is None:
        checkpoint = prepare(settings).plan.checkpoint
    population = build_population(settings.dataset)
    model, _ = load_model(checkpoint)
    p = settings.personalisation

    def load(user):
        data = population.load_user(
            user, label_fraction=p.label_fraction, seed=user_seed(settings.seed, user)
        )
        return data.train_x, data.train_y, data.labelled, data.test_x, data.test_y

    return Study(
        model=model,
        cost_table=cost_table(model),
        users=list(population.held_out_users),
        load=load,
        personalisation=lambda user: p.for_user(user_seed(settings.seed, user)),
    )


def collect_user(model, data, config: PersonalisationConfig, folds: int) -> dict:
    """Exit outputs of one user on both routes, without any guard (applied when evaluating)."""
    x, y, labelled, x_test, y_test = data
    incoming = copy.deepcopy(model.exits.state_dict())
    test = FrozenFeatures(model, x_test)
    record = {"y_test": y_test, "test_shared": test.exit_probabilities(), "seed": config.seed}
    train_idx, val_idx = split_validation(len(x), config.val_fraction, config.seed)
    started = time.perf_counter()
    personalise(model, x[train_idx], y[train_idx], labelled[train_idx], replace(config, guard=False))
    record["val_seconds"] = time.perf_counter() - started
    val = FrozenFeatures(model, x[val_idx])
    record["val_personalised"], record["test_val"] = val.exit_probabilities(), test.exit_probabilities()
    model.exits.load_state_dict(incoming)
    record["val_shared"] = val.exit_probabilities()
    record["val_targets"] = torch.where(labelled[val_idx], y[val_idx], record["val_shared"][-1].argmax(-1))
    oof = personalise_out_of_fold(model, x, y, labelled, replace(config, guard=False), OutOfFoldConfig(folds))
    record["oof_seconds"] = oof.seconds["total_s"]
    record["oof_personalised"], record["oof_shared"] = oof.personalised_probs, oof.shared_probs
    record["oof_targets"], record["test_oof"] = oof.targets, test.exit_probabilities()
    model.exits.load_state_dict(incoming)
    return record


def evaluate_user(
    record: dict, cost_table, route: str, guard: str, metric: str, rule: CalibrationConfig
) -> dict:
    test_kind, confidence = GUARDS[guard]
    personalised, shared, targets = (
        record[f"{route}_{part}"] for part in ("personalised", "shared", "targets")
    )
    num_exits = len(personalised) - 1
    keep, _ = guard_decisions(
        personalised[:num_exits], shared[:num_exits], targets, metric, test_kind, confidence, record["seed"]
    )
    mask = torch.tensor(keep + [False])
    calibration_probs, test_probs = shared.clone(), record["test_shared"].clone()
    calibration_probs[mask], test_probs[mask] = personalised[mask], record[f"test_{route}"][mask]
    calibration = calibrate(calibration_probs, targets, cost_table, config=rule)
    y_test = record["y_test"]
    at = apply_calibration(test_probs, y_test, calibration, cost_table)
    before = (record["test_shared"].argmax(-1) == y_test).double().mean(dim=1)
    after = (test_probs.argmax(-1) == y_test).double().mean(dim=1)
    drop_pp = float(after[-1] - at["accuracy"]) * 100
    return {
        "drop_pp": drop_pp,
        "speedup": calibration.full_mflops / float(at["expected_mflops"]),
        "gain_pp": float((after[:-1] - before[:-1]).mean()) * 100,
        "pairs_hurt": float((after[:-1] < before[:-1] - 1e-12).double().mean()),
        "guard_fired": 1 - sum(keep) / num_exits,
        "threshold": calibration.threshold,
        "n_calibration": calibration.n_calibration,
    }


def summarise(rows: pd.DataFrame, tolerance_pp: float) -> dict:
    return {
        "users": len(rows),
        "mean_drop_pp": rows["drop_pp"].mean(),
        "users_drop_over_1pp": (rows["drop_pp"] > 1).mean(),
        "users_drop_over_2pp": (rows["drop_pp"] > 2).mean(),
        "users_over_tolerance": (rows["drop_pp"] > tolerance_pp).mean(),
        "speedup": rows["speedup"].mean(),
        "pairs_hurt": rows["pairs_hurt"].mean(),
        "gain_pp": rows["gain_pp"].mean(),
        "guard_fired": rows["guard_fired"].mean(),
        "n_calibration": rows["n_calibration"].mean(),
    }


def targets_met(summary: dict) -> int:
    return sum(
        [
            summary["mean_drop_pp"] <= TARGETS["mean_drop_pp"],
            summary["users_drop_over_2pp"] <= TARGETS["users_drop_over_2pp"],
            summary["speedup"] >= TARGETS["speedup"],
            summary["pairs_hurt"] <= TARGETS["pairs_hurt"],
            summary["gain_pp"] >= TARGETS["gain_pp"],
        ]
    )


def evaluate(records: dict, users: list[str], cost_table, metrics: list[str]) -> pd.DataFrame:
    """One row per candidate (guard metric x route x guard x rule), from every user's cached
    outputs. Users are the outer loop: the exact tests' tables depend on a user's sample count
    and are cached."""
    settings = [
        (metric, route, guard, rule)
        for metric in metrics
        for route in ("val", "oof")
        for guard in GUARDS
        for rule in RULES
    ]
    per_user = {setting: [] for setting in settings}
    for user in users:
        for metric, route, guard, rule in settings:
            row = evaluate_user(records[user], cost_table, route, guard, metric, RULES[rule])
            per_user[(metric, route, guard, rule)].append(row)
    rows = []
    for (metric, route, guard, rule), results in per_user.items():
        summary = summarise(pd.DataFrame(results), RULES[rule].drop_tolerance_pp)
        setting = {"guard_metric": metric, "route": route, "guard": guard, "rule": rule}
        rows.append({**setting, **summary, "targets_met": targets_met(summary)})
    return pd.DataFrame(rows)


@exits_2_on_bad_input
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedexits.simulate")
    parser.add_argument("--out", default="results/calibration_rules")
    parser.add_argument("--tuning", help="user list of the tuning half")
    parser.add_argument("--reporting", help="user list of the reporting half")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--checkpoint", help="global model to use instead of training one (indicative runs)")
    parser.add_argument("--write-split", metavar="USERS", help="split this user list into halves and exit")
    parser.add_argument("--seed", type=int, default=0, help="seed of --write-split")
    parser.add_argument("--rules", nargs="+", choices=list(RULES), help="candidate rules (default: all)")
    parser.add_argument("--guards", nargs="+", choices=list(GUARDS), help="candidate guards (default: all)")
    parser.add_argument(
        "--guard-metrics",
        nargs="+",
        choices=list(GUARD_METRICS),
        default=[PersonalisationConfig().guard_metric],
        help="what the guard compares (default: the personalisation default's)",
    )
    parser.add_argument(
        "--minutes", type=float, help="stop collecting after this long (runs resume from the cache)"
    )
    args = parser.parse_args()
    if args.write_split:
        users = read_held_out_file(args.write_split)
        halves = tuning_reporting_split(users, args.seed)
        for name, half in zip(("tuning", "reporting"), halves):
            path = Path(args.write_split).with_name(
                Path(args.write_split).stem.replace("held_out", name) + ".txt"
            )
            header = f"{name} half of {args.write_split}: tuning_reporting_split(seed={args.seed})"
            write_user_list(path, half, header)
            print(f"{path}: {len(half)} users")
        return
    for names, table in ((args.rules, RULES), (args.guards, GUARDS)):
        for name in set(table) - set(names or table):
            del table[name]
    out = Path(args.out)
    cache = out / "outputs"
    cache.mkdir(parents=True, exist_ok=True)
    study = prepare_study(args.overrides, args.checkpoint)
    tuning, reporting = read_held_out_file(args.tuning), read_held_out_file(args.reporting)
    records, started_all = {}, time.perf_counter()
    for i, user in enumerate(reporting + tuning):  # the reporting half first: it is the result
        path = cache / f"{user}.pt"
        if not path.exists():
            if args.minutes and time.perf_counter() - started_all > 60 * args.minutes:
                continue
            started = time.perf_counter()
            record = collect_user(study.model, study.load(user), study.personalisation(user), args.folds)
            atomic_write(path, lambda f, r=record: torch.save(r, f), "wb")
            print(
                f"[{i + 1}/{len(tuning) + len(reporting)}] {user}: {time.perf_counter() - started:.1f} s",
                flush=True,
            )
        records[user] = torch.load(path)
    tuning = [user for user in tuning if user in records]
    reporting = [user for user in reporting if user in records]
    print(f"outputs cached for {len(tuning)} tuning and {len(reporting)} reporting users")
    if not tuning:
        return
    pd.set_option("display.width", 250)
    tuned = evaluate(records, tuning, study.cost_table, args.guard_metrics)
    atomic_write(out / "tuning.csv", lambda f: tuned.to_csv(f, index=False), "w")
    # Only a rule with a stated guarantee may become the default: the first round's criterion
    # allowed heuristics and chose margin z=2, which left 24% of the reporting users over 1 pp.
    guaranteed = tuned[tuned["rule"].map(lambda name: RULES[name].rule == "ltt")]
    best = guaranteed.sort_values(["targets_met", "speedup"], ascending=False).iloc[0]
    print("TUNING half:\n", tuned.round(3).to_string(index=False))
    print(
        f"\nchosen on the tuning half: guard metric {best['guard_metric']}, route {best['route']}, "
        f"guard {best['guard']}, rule {best['rule']}"
    )
    if not reporting:
        return
    reported = evaluate(records, reporting, study.cost_table, args.guard_metrics)
    chosen = (
        (reported["guard_metric"] == best["guard_metric"])
        & (reported["route"] == best["route"])
        & (reported["guard"] == best["guard"])
        & (reported["rule"] == best["rule"])
    )
    reported.insert(0, "chosen_on_tuning", chosen)
    atomic_write(out / "reporting.csv", lambda f: reported.to_csv(f, index=False), "w")
    print("\nREPORTING half (not tuned on):\n", reported.round(3).to_string(index=False))


if __name__ == "__main__":
    sys.exit(main())
