"""End to end: `python -m fedexits.simulate` with Flower + Ray on a tiny model and a few users."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedexits.data import build_population
from fedexits.simulate import TIMING_COLUMNS, compose_config

# Tiny and label-skewed (each writer sees few classes), so personalisation has something to learn.
TINY = [
    "+experiment=smoke",
    "dataset.num_writers=16",
    "dataset.images_per_writer_mean=90",
    "dataset.images_per_writer_sd=10",
    "dataset.images_per_writer_min=60",
    "dataset.num_held_out=5",
    "dataset.n_test=25",
    "dataset.label_skew=30",
    "simulation.num_users=4",
    "global_training.epochs=2",
    "personalisation.lr=0.01",
    "federated.rounds=2",
    "federated.clients_per_round=3",
]


def run_cli(args, env, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "fedexits.simulate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"simulate failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "FEDEXITS_CACHE_DIR": str(cache)}


@pytest.fixture(scope="module")
def broken_user(env):
    """Corrupt one held-out user's labels in the data cache: its client must fail alone."""
    config = compose_config(TINY + [f"cache_dir={env['FEDEXITS_CACHE_DIR']}"])
    population = build_population(config["dataset"])
    user = population.held_out_users[0]
    labels = np.load(Path(population.cache.path) / "labels.npy", mmap_mode="r+")
    labels[population.cache.user_slice(user)] = 99
    labels.flush()
    return user


@pytest.fixture(scope="module")
def two_runs(env, broken_user, tmp_path_factory):
    """The same seed twice, every init, every user (the broken one included)."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(f"run_{name}")
        run_cli(TINY + ["init=compare", "simulation.num_users=null", f"hydra.run.dir={out}"], env)
        runs.append(out)
    return runs


def test_run_leaves_every_promised_file(two_runs):
    out = two_runs[0]
    for name in (
        "per_user.csv",
        "thresholds.csv",
        "sweep.csv",
        "failures.csv",
        "summary.json",
        "report.md",
        "accuracy_cdf.png",
        "accuracy_vs_cost.png",
        "accuracy_vs_latency.png",
    ):
        assert (out / name).stat().st_size > 0, name
    per_user = pd.read_csv(out / "per_user.csv")
    for column in (
        "user",
        "init",
        "stage",
        "exit",
        "accuracy",
        "mflops",
        "params",
        "latency_ms",
        "n_train",
        "n_test",
    ):
        assert column in per_user.columns
    assert set(per_user["init"]) == {"global", "federated", "scratch"}
    assert set(per_user["stage"]) == {"global", "personalised"}
    assert sorted(per_user["exit"].unique()) == [0, 1, 2, 3, 4]
    thresholds = pd.read_csv(out / "thresholds.csv")
    assert {"threshold", "accuracy", "expected_mflops", "speedup"} <= set(thresholds.columns)


def test_personalised_exits_beat_global_ones_and_final_is_untouched(two_runs):
    per_user = pd.read_csv(two_runs[0] / "per_user.csv")
    wide = per_user.pivot_table(index=["init", "user", "exit"], columns="stage", values="accuracy")
    final = wide.xs(4, level="exit")
    assert (final["global"] == final["personalised"]).all()
    early = wide[wide.index.get_level_values("exit") < 4]
    for init in ("global", "scratch"):
        gain = early.xs(init, level="init")
        assert gain["personalised"].mean() > gain["global"].mean(), init


def test_broken_client_is_reported_and_the_run_completes(two_runs, broken_user):
    failures = pd.read_csv(two_runs[0] / "failures.csv")
    assert set(failures["user"]) == {broken_user}
    assert len(failures) == 3  # once per init
    assert failures["error"].str.contains(f"user {broken_user}").all()
    assert failures["error"].str.contains("labels must be in 0..61").all()
    summary = json.loads((two_runs[0] / "summary.json").read_text())
    assert summary["users"]["failed"] == 1 and summary["users"]["ok"] == 4
    assert broken_user in (two_runs[0] / "report.md").read_text()


def test_same_seed_gives_identical_per_user_results(two_runs):
    a, b = (pd.read_csv(run / "per_user.csv") for run in two_runs)
    keep = [c for c in a.columns if c not in TIMING_COLUMNS]
    assert len(a) == 4 * 2 * 5 * 3  # 4 ok users x 2 stages x 5 exits x 3 inits
    pd.testing.assert_frame_equal(a[keep], b[keep])
    ta, tb = (pd.read_csv(run / "thresholds.csv") for run in two_runs)
    keep = [c for c in ta.columns if c not in TIMING_COLUMNS]
    pd.testing.assert_frame_equal(ta[keep], tb[keep])


def test_sweep_runs_each_job_and_a_rejected_setting_fails_alone(env, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        ["-m", *TINY, "personalisation.lr=0.01,-1", "simulation.num_users=2", f"hydra.sweep.dir={sweep_dir}"],
        env,
    )
    assert result.returncode == 0
    assert (sweep_dir / "0" / "summary.json").exists()
    error = (sweep_dir / "1" / "error.txt").read_text().strip()
    assert "lr must be > 0" in error and "\n" not in error
    collected = subprocess.run(
        [sys.executable, "-m", "fedexits.collect", str(sweep_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert collected.returncode == 0, collected.stderr
    table = pd.read_csv(sweep_dir / "sweep.csv")
    assert set(table["status"]) == {"ok", "failed"}
    assert table.loc[table["status"] == "failed", "error"].str.contains("lr must be > 0").all()


def test_bad_setting_in_a_single_run_is_one_clear_line(env, tmp_path):
    result = run_cli(TINY + ["personalisation.temperature=0", f"hydra.run.dir={tmp_path}"], env, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: temperature must be > 0, got 0"
    assert "Traceback" not in result.stderr
