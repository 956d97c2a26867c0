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
from fedexits.report.schema import TIMING_COLUMNS
from fedexits.study import compose_config

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


def run_cli(args, env, check=True, cwd=None, timeout=600):
    result = subprocess.run(
        [sys.executable, "-m", "fedexits.simulate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"simulate failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def cache_env(path: Path) -> dict:
    return {**os.environ, "FEDEXITS_CACHE_DIR": str(path)}


def corrupt_labels(env: dict, users: slice) -> list[str]:
    """Give held-out users labels outside the model's classes in the data cache: their clients
    must fail alone, with one line each."""
    settings = compose_config(TINY + [f"cache_dir={env['FEDEXITS_CACHE_DIR']}"])
    population = build_population(settings.dataset)
    chosen = population.held_out_users[users]
    labels = np.load(Path(population.cache.path) / "labels.npy", mmap_mode="r+")
    for user in chosen:
        labels[population.cache.user_slice(user)] = 99
    labels.flush()
    return chosen


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cache_env(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same seed twice, each COLD (its own cache: data and global model built from scratch),
    every init, every user, one of them broken. Returns (run dirs, the broken user)."""
    runs, broken = [], set()
    for name in ("a", "b"):
        env = cache_env(tmp_path_factory.mktemp(f"cache_{name}"))
        broken.update(corrupt_labels(env, slice(0, 1)))
        out = tmp_path_factory.mktemp(f"run_{name}")
        overrides = [
            "init=compare",
            "simulation.num_users=null",
            "simulation.max_failed_fraction=0.5",
            "simulation.save_exits=true",
        ]
        run_cli(TINY + overrides + [f"hydra.run.dir={out}"], env)
        runs.append(out)
    assert len(broken) == 1
    return runs, broken.pop()


def test_run_leaves_every_promised_file(two_runs):
    out = two_runs[0][0]
    for name in (
        "per_user.csv",
        "thresholds.csv",
        "sweep.csv",
        "failures.csv",
        "cost_table.csv",
        "latency.csv",
        "summary.json",
        "report.md",
        "accuracy_cdf.png",
        "accuracy_vs_cost.png",
        "accuracy_vs_latency.png",
        "federated.csv",
        "federated_accuracy.png",
    ):
        assert (out / name).stat().st_size > 0, name
    per_user = pd.read_csv(out / "per_user.csv")
    for column in ("user", "init", "stage", "exit", "accuracy", "mflops", "params", "latency_ms", "n_train"):
        assert column in per_user.columns
    assert set(per_user["init"]) == {"global", "federated", "scratch"}
    assert set(per_user["stage"]) == {"global", "personalised"}
    assert sorted(per_user["exit"].unique()) == [0, 1, 2, 3, 4]
    thresholds = pd.read_csv(out / "thresholds.csv")
    assert {"threshold", "accuracy", "expected_mflops", "speedup"} <= set(thresholds.columns)
    report = (out / "report.md").read_text()
    assert "[`cost_table.csv`](cost_table.csv)" in report
    assert "## Federated exit training" in report and "## What trained the exits" in report
    federated = pd.read_csv(out / "federated.csv")
    assert list(federated["round"]) == [0, 1, 2]
    assert federated["accuracy_early_exits"].notna().iloc[[0, -1]].all()  # the start and the last round
    budget = {row["init"]: row for row in json.loads((out / "summary.json").read_text())["budget"]}
    assert budget["federated"]["samples"] > 0 and budget["scratch"]["tflops"] == 0
    assert budget["global"]["tflops"] > 0
    assert "Latency (latency_ms, ms/sample) was measured with onnxruntime on 1 thread(s)" in report
    latency = pd.read_csv(out / "latency.csv")
    assert set(latency["runtime"]) == {"onnxruntime"} and set(latency["batch_size"]) == {1, 32}
    assert "calibrated on out-of-fold outputs on every personalisation image" in report
    assert "dataset.settings" not in report  # no font lists in the setup table
    assert report.count("drop_tolerance_pp") == 1
    for line in (out / "per_user.csv").read_text().splitlines()[1:]:
        assert "0000000" not in line and "9999999" not in line, line  # no float32 tails


def test_personalised_exits_beat_global_ones_and_final_is_untouched(two_runs):
    per_user = pd.read_csv(two_runs[0][0] / "per_user.csv")
    wide = per_user.pivot_table(index=["init", "user", "exit"], columns="stage", values="accuracy")
    final = wide.xs(4, level="exit")
    assert (final["global"] == final["personalised"]).all()
    early = wide[wide.index.get_level_values("exit") < 4]
    for init in ("global", "scratch"):
        gain = early.xs(init, level="init")
        assert gain["personalised"].mean() > gain["global"].mean(), init


def test_broken_client_is_reported_and_the_run_completes(two_runs):
    (out, _), broken_user = two_runs
    failures = pd.read_csv(out / "failures.csv")
    assert set(failures["user"]) == {broken_user}
    assert len(failures) == 3  # once per init
    assert failures["error"].str.contains(f"user {broken_user}").all()
    assert failures["error"].str.contains("labels must be in 0..61").all()
    assert set(failures["kind"]) == {"user"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["users"]["failed"] == 1 and summary["users"]["ok"] == 4
    assert summary["status"] == "ok"  # 1 of 5 failed: within max_failed_fraction=0.5
    assert broken_user in (out / "report.md").read_text()


def test_a_cold_run_is_reproducible_from_its_seed(two_runs):
    """Two runs in separate caches build their data and global model from scratch; with the
    same seed, every per-user number is the same (timing columns aside)."""
    a, b = (pd.read_csv(run / "per_user.csv") for run in two_runs[0])
    keep = [c for c in a.columns if c not in TIMING_COLUMNS]
    assert len(a) == 4 * 2 * 5 * 3  # 4 ok users x 2 stages x 5 exits x 3 inits
    pd.testing.assert_frame_equal(a[keep], b[keep])
    ta, tb = (pd.read_csv(run / "thresholds.csv") for run in two_runs[0])
    keep = [c for c in ta.columns if c not in TIMING_COLUMNS]
    pd.testing.assert_frame_equal(ta[keep], tb[keep])
    losses = [
        json.loads((run / "summary.json").read_text())["meta"]["global_training"] for run in two_runs[0]
    ]
    assert losses[0]["epoch_loss"] == losses[1]["epoch_loss"]


def test_a_saved_user_exports_to_onnx_and_bad_requests_are_one_line(two_runs, tmp_path):
    (out, _), broken_user = two_runs
    user = next(u for u in pd.read_csv(out / "per_user.csv")["user"].unique() if u != broken_user)
    assert sorted(p.name for p in (out / "exits").iterdir()) == [
        "federated",
        "global",
        "global_model.pt",
        "scratch",
    ]

    def export(*args):
        command = [sys.executable, "-m", "fedexits.export", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=600)

    result = export(str(out), "--user", user, "--init", "scratch", "--out", str(tmp_path / "onnx"))
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    thresholds = pd.read_csv(out / "thresholds.csv").set_index(["init", "user"])
    assert {t for t in manifest["thresholds"] if t is not None} <= {
        thresholds.loc[("scratch", user), "threshold"]
    }
    for args, message in (
        (["--user", "nobody"], "exits file"),
        (["--user", user, "--init", "elsewhere"], "does not exist"),
    ):
        result = export(str(out), *args, "--out", str(tmp_path / "never"))
        assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1], result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "never").exists()


def test_a_run_in_which_every_user_fails_exits_non_zero_after_its_report(tmp_path):
    env = cache_env(tmp_path / "cache")
    corrupt_labels(env, slice(None))
    out = tmp_path / "run"
    result = run_cli(TINY + [f"hydra.run.dir={out}"], env, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "run failed: no user has a result" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["users"]["ok"] == 0
    assert len(pd.read_csv(out / "failures.csv")) == 4
    assert "Run status: **failed**: no user has a result" in (out / "report.md").read_text()


def test_sweep_runs_each_job_and_a_rejected_setting_fails_alone(env, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        ["-m", *TINY, "personalisation.lr=0.01,-1", "simulation.num_users=2", f"hydra.sweep.dir={sweep_dir}"],
        env,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]  # bad input in one job; the others ran
    assert (sweep_dir / "0" / "summary.json").exists()
    error = (sweep_dir / "1" / "error.txt").read_text().strip()
    assert error == "personalisation.lr must be > 0, got -1.0"
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


@pytest.mark.parametrize(
    "override, message",
    [
        ("personalisation.temperature=0", "personalisation.temperature must be > 0, got 0.0"),
        ("personalisation.epochs=ten", "personalisation.epochs: Value 'ten' of type 'str' could not be"),
        ("simulation.num_users=0", "simulation.num_users must be an integer >= 1 (or null), got 0"),
        ("simulation.client_cpus=0", "simulation.client_cpus must be > 0"),
        ("federated.local_epochs=0", "federated.local_epochs must be an integer >= 1, got 0"),
        ("dataset=femnist_leaf", "dataset.path is required"),
        ("model=resnet", "model=resnet: no such option; available: femnist_mobilenet_v2, mobilenet_v2"),
        ("dataset.num_writer=3", "dataset.num_writer: Key 'num_writer' not in 'SyntheticConfig'"),
        ("device=cuda:7", "device cuda:7: no such CUDA device"),
    ],
)
def test_bad_setting_is_one_line_and_refused_before_any_work(tmp_path, override, message):
    """Every setting is checked before the data cache, the global model or Ray start."""
    assert_refused_before_any_work(tmp_path, override, message)


def assert_refused_before_any_work(tmp_path, override: str, message: str) -> None:
    """The command line refuses `override` with one line starting with `message`, exit code 2,
    no traceback, and no data cache or global model written."""
    cache = tmp_path / "cache"
    result = run_cli([override, f"hydra.run.dir={tmp_path / 'run'}"], cache_env(cache), check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {message}"), lines[-1]
    assert "Traceback" not in result.stderr
    assert not cache.exists()


def test_the_wheel_carries_the_configuration(tmp_path):
    """A non-editable install must find conf/ inside the package (.ci/run also runs the smoke
    experiment from an installed wheel in a fresh environment)."""
    import zipfile

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("fedexits-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "config.yaml",
        "experiment/smoke.yaml",
        "experiment/paper.yaml",
        "experiment/imagenet.yaml",
    ):
        assert f"fedexits/conf/{expected}" in names, expected


def test_every_script_turns_bad_input_into_one_line_and_exit_code_2(capsys):
    import ast

    from fedexits.errors import EXIT_BAD_INPUT, SettingsError, exits_2_on_bad_input

    root = Path(__file__).parent.parent
    for script in sorted(
        [*root.glob("simulations/*.py"), *root.glob("benchmarks/*.py"), *root.glob("data_prep/*.py")]
    ):
        tree = ast.parse(script.read_text())
        main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
        assert any(getattr(d, "id", None) == "exits_2_on_bad_input" for d in main.decorator_list), script.name

    @exits_2_on_bad_input
    def command(value):
        if value < 0:
            raise SettingsError(f"--value must be >= 0, got {value}\nsecond line")
        if value == 0:
            raise ZeroDivisionError("a bug")
        return None

    assert command(1) == 0
    assert command(-1) == EXIT_BAD_INPUT == 2
    assert capsys.readouterr().err == "error: --value must be >= 0, got -1\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        command(0)
