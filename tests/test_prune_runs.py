"""Pruning in a run: `personalisation.baselines` run the pruning methods on the same users as the
exits, every per-user table says which method a row is, bad pruning settings are one line, and
the same seed gives the same results per method (no state leaks between users or methods)."""

import math
import re

import pandas as pd
import pytest

from fedexits.errors import SettingsError
from fedexits.report.records import UserRecord
from fedexits.report.results import build_frames
from fedexits.report.schema import TIMING_COLUMNS
from fedexits.study import compose_config
from fedexits.study.prepare import initial_exits, prepare
from fedexits.study.worker import get_worker, run_users_in_process
from tests.test_simulate import TINY, assert_refused_before_any_work, cache_env, run_cli

# The smallest run that still has something to compare (no accuracy is asserted here).
BASELINES = [
    "personalisation.baselines=[prune_data,prune_agnostic]",
    "personalisation.prune_levels=[0.5]",
    "dataset.num_writers=10",
    "dataset.num_held_out=3",
    "global_training.epochs=1",
    "personalisation.epochs=2",
]
METHODS = {"exits", "prune_data", "prune_agnostic"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cache_env(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def run_dir(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_cli(TINY + BASELINES + ["simulation.num_users=2", f"hydra.run.dir={out}"], env, timeout=1800)
    return out


def test_baselines_give_per_user_rows_for_every_method(run_dir):
    per_user = pd.read_csv(run_dir / "per_user.csv")
    assert set(per_user["method"]) == METHODS
    users = set(per_user["user"])
    assert len(users) == 2
    personalised = per_user[per_user["stage"] == "personalised"]
    for method in METHODS:  # every method served the same users
        assert set(personalised.loc[personalised["method"] == method, "user"]) == users, method
    final = per_user["exit"].max()
    pruned = personalised[personalised["method"] != "exits"]
    assert set(pruned["exit"]) == {final}  # a pruned network has no early exits
    full_mflops = per_user.loc[(per_user["stage"] == "global") & (per_user["exit"] == final), "mflops"].iloc[
        0
    ]
    assert pruned["mflops"].between(0.45 * full_mflops, 0.55 * full_mflops).all()  # 50% removed, +-10%
    assert (pruned["params"] < per_user["params"].max()).all()
    for name in ("thresholds.csv", "sweep.csv", "failures.csv", "prune_sweep.csv"):
        assert "method" in pd.read_csv(run_dir / name).columns, name
    prune_sweep = pd.read_csv(run_dir / "prune_sweep.csv")
    assert set(prune_sweep["method"]) == {"prune_data", "prune_agnostic"}
    assert set(prune_sweep["level"]) == {0.5}
    report = (run_dir / "report.md").read_text()
    assert "## Methods" in report and "Pruning gives up the fail-safe" in report
    assert (run_dir / "methods.png").stat().st_size > 0


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "personalisation.prune_flops_fraction=1.5",
            "personalisation.prune_flops_fraction must be in (0, 1)",
        ),
        ("personalisation.prune_levels=[0.5,0.5]", "personalisation.prune_levels must be a list without"),
        ("personalisation.prune_levels=[0.25,1.0]", "personalisation.prune_levels must be a list of shares"),
        ("personalisation.baselines=[prune_everything]", "personalisation.baselines must be a list from"),
        ("personalisation.baselines=[exits]", "personalisation.baselines must be other than the method"),
    ],
)
def test_bad_pruning_settings_are_one_line_and_refused_before_any_work(tmp_path, override, message):
    with pytest.raises(SettingsError, match="^" + re.escape(message)):
        compose_config(["+experiment=smoke", override])
    assert_refused_before_any_work(tmp_path, override, message)


def _results(records: list[UserRecord], cost_table) -> pd.DataFrame:
    frame = build_frames(records, cost_table)["per_user"]
    return frame.drop(columns=[c for c in TIMING_COLUMNS if c in frame.columns]).reset_index(drop=True)


def test_the_same_seed_gives_the_same_results_per_method_and_nothing_leaks(env, run_dir, monkeypatch):
    """In process, from the run's cached global model: each method twice on fresh workers gives
    the same per-user results; and a worker that served other users and methods first gives the
    same results as a fresh one (the pruning methods work on copies; nothing leaks)."""
    monkeypatch.setenv("FEDEXITS_CACHE_DIR", env["FEDEXITS_CACHE_DIR"])
    settings = compose_config(TINY + BASELINES + ["simulation.num_users=2"])
    prepared = prepare(settings, progress=False)
    plan, users = prepared.plan, sorted(pd.read_csv(run_dir / "per_user.csv")["user"].unique())
    exits = initial_exits(plan, "global")
    fresh = {}
    for method in ("prune_data", "prune_agnostic", "exits"):
        runs = []
        for _ in range(2):
            get_worker.cache_clear()
            records = run_users_in_process(plan, users, exits, progress=False, method=method)
            assert all(r.result is not None and r.method == method for r in records)
            runs.append(_results(records, prepared.cost_table))
        pd.testing.assert_frame_equal(runs[0], runs[1])
        assert not math.isnan(runs[0]["accuracy"].iloc[-1])
        fresh[method] = runs[0]
    # One worker, every method in turn, each user last after the others: the same results.
    get_worker.cache_clear()
    for method in ("prune_data", "exits", "prune_agnostic"):
        records = run_users_in_process(plan, users[::-1], exits, progress=False, method=method)
        again = _results(sorted(records, key=lambda r: users.index(r.user)), prepared.cost_table)
        pd.testing.assert_frame_equal(fresh[method], again)
