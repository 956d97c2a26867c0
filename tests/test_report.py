"""Report layer and sweep collector on small hand-built results (no simulation, no Flower).

Hand case, init "global" (users u0, u1, u2; exits 0, 1, 2 and the final classifier 3):
  exit 0: u0 .40 -> .50 (helped), u1 .50 -> .45 (hurt), u2 .60 -> .60 (unchanged)
  exit 1: every user +.10 (all helped); exit 2: u0 +.05, u1 -.05, u2 unchanged
Init "federated": same "before" accuracies, every early exit -.05 (all hurt).
Failure: u3 for init federated.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedexits import collect
from fedexits.report import exit_table, load_run, summarise, threshold_table, write_run_report
from fedexits.report.files import atomic_write_json
from fedexits.report.lifecycle import target_metrics
from fedexits.report.lifecycle_sweep import LIFECYCLE_SWEEP_PNG
from fedexits.report.plots import CDF_PNG, COST_PNG, LATENCY_PNG, SWEEP_PNG
from fedexits.report.schema import (
    FAILURE_COLUMNS,
    PER_USER_COLUMNS,
    SWEEP_COLUMNS,
    THRESHOLD_COLUMNS,
)

PYTHON = sys.executable
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
USERS = ["u0", "u1", "u2"]
BEFORE = {
    0: [0.40, 0.50, 0.60],
    1: [0.50, 0.60, 0.70],
    2: [0.60, 0.70, 0.80],
    3: [0.90, 0.80, 0.85],
}
AFTER_GLOBAL = {0: [0.50, 0.45, 0.60], 1: [0.60, 0.70, 0.80], 2: [0.65, 0.65, 0.80], 3: BEFORE[3]}
MFLOPS, PARAMS, LATENCY = [10.0, 25.0, 45.0, 80.0], [1000, 3000, 6000, 10000], [1.0, 2.0, 3.0, 5.0]
ERROR = "DataError: user u3 has 4 images, needs at least 10"
META = {
    "dataset": {"name": "synthetic"},
    "model": {"backbone": "tiny-cnn"},
    "seed": 7,
    "calibration": {"drop_tolerance_pp": 1.0},
    "timings": {"global_model_s": 1.5, "simulation_s": 2.5, "total_s": 4.0},
    "config": {"personalisation": {"alpha": 1.0, "epochs": 3}},
}


def _after(init: str, exit_index: int) -> list[float]:
    if init == "global" or exit_index == 3:
        return AFTER_GLOBAL[exit_index]
    return [round(value - 0.05, 10) for value in BEFORE[exit_index]]


def make_per_user() -> pd.DataFrame:
    rows = []
    for init in ("global", "federated"):
        for exit_index in range(4):
            for stage, values in (
                ("global", BEFORE[exit_index]),
                ("personalised", _after(init, exit_index)),
            ):
                for position, (user, accuracy) in enumerate(zip(USERS, values)):
                    fired = pd.NA if stage == "global" or init == "federated" else user == "u1"
                    rows.append(
                        {
                            "user": user,
                            "init": init,
                            "stage": stage,
                            "exit": exit_index,
                            "accuracy": accuracy,
                            "mflops": MFLOPS[exit_index],
                            "params": PARAMS[exit_index],
                            "latency_ms": LATENCY[exit_index],
                            "n_train": 40,
                            "n_test": 20,
                            "n_labelled": 40,
                            "guard_fired": fired,
                            "personalise_s": 1.0 + position,
                        }
                    )
    return pd.DataFrame(rows)


def make_thresholds() -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "user": USERS * 2,
            "init": ["global"] * 3 + ["federated"] * 3,
            "threshold": [0.8, 0.9, 0.7, 0.6, 0.6, 0.6],
            "accuracy": [0.89, 0.80, 0.84, 0.88, 0.79, 0.84],
            "final_accuracy": BEFORE[3] * 2,
            "speedup": [2.0, 1.5, 3.0, 1.2, 1.2, 1.2],
        }
    )
    frame["expected_mflops"] = 80.0 / frame["speedup"]
    frame["expected_latency_ms"] = 5.0 / (frame["speedup"] * 0.8)
    frame["latency_speedup"] = frame["speedup"] * 0.8
    return frame


def make_sweep() -> pd.DataFrame:
    thresholds = np.round(np.arange(0.0, 1.0001, 0.05), 2)
    rows = [
        {
            "user": user,
            "init": init,
            "threshold": t,
            "accuracy": 0.5 + 0.3 * t,
            "expected_mflops": 10 + 70 * t,
            "expected_latency_ms": 1 + 4 * t,
        }
        for init in ("global", "federated")
        for user in USERS
        for t in thresholds
    ]
    return pd.DataFrame(rows)


def make_failures() -> pd.DataFrame:
    return pd.DataFrame({"user": ["u3"], "init": ["federated"], "kind": ["user"], "error": [ERROR]})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("run")
    write_run_report(directory, make_per_user(), make_thresholds(), make_sweep(), make_failures(), META)
    return directory


def _exit_row(table: pd.DataFrame, init: str, exit_index: int) -> pd.Series:
    rows = table[(table["init"] == init) & (table["exit"] == exit_index)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_every_output_file_exists_and_is_not_empty(run_dir):
    names = [
        "per_user.csv",
        "thresholds.csv",
        "sweep.csv",
        "failures.csv",
        "summary.json",
        "report.md",
        CDF_PNG,
        COST_PNG,
        LATENCY_PNG,
    ]
    for name in names:
        assert (run_dir / name).stat().st_size > 0, name
    assert not list(run_dir.glob(".*.tmp")), "temporary files left behind"


def test_csv_columns_follow_the_schema(run_dir):
    expected = {
        "per_user.csv": PER_USER_COLUMNS,
        "thresholds.csv": THRESHOLD_COLUMNS,
        "sweep.csv": SWEEP_COLUMNS,
        "failures.csv": FAILURE_COLUMNS,
    }
    for name, columns in expected.items():
        assert list(pd.read_csv(run_dir / name, nrows=0).columns) == columns, name


def test_helped_hurt_unchanged_shares_on_the_hand_case():
    table = exit_table(make_per_user())
    first = _exit_row(table, "global", 0)
    assert (first["share_helped"], first["share_hurt"], first["share_unchanged"]) == pytest.approx(
        (1 / 3, 1 / 3, 1 / 3)
    )
    assert first["gain_pp_mean"] == pytest.approx((10 - 5 + 0) / 3)
    assert first["accuracy_after_mean"] == pytest.approx((0.50 + 0.45 + 0.60) / 3)
    assert first["accuracy_after_median"] == pytest.approx(0.50)
    assert first["share_guard_fired"] == pytest.approx(1 / 3)
    assert _exit_row(table, "global", 1)["share_helped"] == pytest.approx(1.0)
    assert _exit_row(table, "federated", 2)["share_hurt"] == pytest.approx(1.0)
    assert np.isnan(_exit_row(table, "federated", 0)["share_guard_fired"])  # all NA: unknown
    final = _exit_row(table, "global", 3)
    assert bool(final["is_final"]) and final["share_unchanged"] == pytest.approx(1.0)
    assert list(table["init"].unique()) == ["global", "federated"]  # paper order, not alphabetical
    assert (final["mflops"], final["params"]) == (80.0, 10000)


def test_threshold_table_means_and_medians():
    table = threshold_table(make_thresholds()).set_index("init")
    assert table.loc["global", "speedup_mean"] == pytest.approx((2.0 + 1.5 + 3.0) / 3)
    assert table.loc["global", "threshold_median"] == pytest.approx(0.8)
    assert table.loc["global", "accuracy_drop_pp_mean"] == pytest.approx((1 + 0 + 1) / 3)
    assert table.loc["federated", "latency_speedup_mean"] == pytest.approx(0.96)


def test_summary_json_matches_a_hand_computation(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["users"] == {"total": 4, "ok": 3, "failed": 1}
    assert summary["user_runs"] == {"ok": 6, "failed": 1}
    assert summary["times"] == META["timings"] and summary["drop_tolerance_pp"] == 1.0
    glob = summary["inits"]["global"]
    assert (glob["users_ok"], glob["users_failed"]) == (3, 0)
    assert summary["inits"]["federated"]["users_failed"] == 1
    assert glob["mean_speedup"] == pytest.approx(6.5 / 3)
    # early exits' gains in pp: exit 0 5/3, exit 1 10, exit 2 0
    assert glob["early_exit_gain_pp_mean"] == pytest.approx((5 / 3 + 10 + 0) / 3)
    assert summary["inits"]["federated"]["early_exit_gain_pp_mean"] == pytest.approx(-5.0)
    assert glob["mean_personalise_s"] == pytest.approx(2.0)
    exit0 = glob["exits"][0]
    assert exit0["exit"] == 0 and exit0["accuracy_before_median"] == pytest.approx(0.5)
    assert (exit0["share_helped"], exit0["share_hurt"]) == pytest.approx((1 / 3, 1 / 3))
    assert summary["inits"]["federated"]["exits"][0]["share_guard_fired"] is None
    assert glob["thresholds"]["n_users"] == 3


def test_figures_are_png_and_report_embeds_them(run_dir):
    report = (run_dir / "report.md").read_text()
    for name in (CDF_PNG, COST_PNG, LATENCY_PNG):
        assert (run_dir / name).read_bytes()[:8] == PNG_SIGNATURE, name
        assert f"]({name})" in report, name
    width, height = np.frombuffer((run_dir / CDF_PNG).read_bytes()[16:24], dtype=">u4")
    assert width > 1.5 * height  # one panel per init, side by side


def test_report_is_readable_on_its_own(run_dir):
    report = (run_dir / "report.md").read_text()
    assert report.startswith("# fedexits run report: synthetic / tiny-cnn")
    assert f"- user `u3`, init `federated` (user): {ERROR}" in report
    assert "| global | exit 0 |" in report and "| +1.67 |" in report  # per-exit table, gain
    assert "| total_s | 4.0 |" in report  # times
    assert "config.personalisation.alpha" in report  # setup from meta


def test_load_run_round_trips_the_tables(tmp_path):
    per_user = make_per_user().assign(user=lambda f: f["user"].map({"u0": "007", "u1": "NA", "u2": "u2"}))
    write_run_report(tmp_path, per_user, make_thresholds(), make_sweep(), make_failures(), META)
    loaded = load_run(tmp_path)
    assert set(loaded["per_user"]["user"]) == {"007", "NA", "u2"}  # ids stay text
    assert str(loaded["per_user"]["guard_fired"].dtype) == "boolean"
    assert loaded["per_user"]["accuracy"].tolist() == pytest.approx(per_user["accuracy"].tolist())
    assert loaded["failures"]["error"].tolist() == [ERROR]
    pd.testing.assert_frame_equal(exit_table(loaded["per_user"]), exit_table(per_user))
    assert loaded["summary"]["users"]["ok"] == 3


def test_no_failures_still_writes_failures_csv_with_header(tmp_path):
    write_run_report(tmp_path, make_per_user(), make_thresholds(), make_sweep(), None, META)
    assert (tmp_path / "failures.csv").read_text().strip() == "user,init,method,kind,error"
    assert "No user failed." in (tmp_path / "report.md").read_text()


def test_a_run_where_every_user_failed_still_gets_a_report(tmp_path):
    summary = write_run_report(tmp_path, pd.DataFrame(), None, pd.DataFrame(), make_failures(), META)
    assert summary["users"] == {"total": 1, "ok": 0, "failed": 1}
    assert (tmp_path / CDF_PNG).read_bytes()[:8] == PNG_SIGNATURE
    assert ERROR in (tmp_path / "report.md").read_text()


def test_missing_column_fails_clearly_but_keeps_the_raw_csvs(tmp_path):
    broken = make_per_user().drop(columns="mflops")
    with pytest.raises(ValueError, match=r"per_user is missing column\(s\) \['mflops'\]"):
        write_run_report(tmp_path, broken, make_thresholds(), make_sweep(), make_failures(), META)
    assert (tmp_path / "per_user.csv").exists() and not (tmp_path / "summary.json").exists()


def _fake_job(sweep_dir: Path, job: int, overrides: list[str]) -> Path:
    job_dir = sweep_dir / str(job)
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return job_dir


@pytest.fixture
def sweep_dir(tmp_path, run_dir) -> Path:
    """Job 0: the report above; job 1: better exits (summary only); job 2: rejected setting."""
    sweep = tmp_path / "multirun"
    shutil.copy(run_dir / "summary.json", _fake_job(sweep, 0, ["personalisation.alpha=0", "init=global"]))
    better = make_per_user()
    better.loc[better["stage"] == "personalised", "accuracy"] += 0.01
    job1 = _fake_job(sweep, 1, ["personalisation.alpha=1", "init=global"])
    atomic_write_json(summarise(better, make_thresholds(), None, META), job1 / "summary.json")
    job2 = _fake_job(sweep, 2, ["personalisation.alpha=-1", "init=global"])
    (job2 / "error.txt").write_text("ValueError: alpha must be >= 0, got -1\n")
    return sweep


def test_collect_gathers_ok_and_failed_jobs(sweep_dir, tmp_path, capsys):
    out = tmp_path / "collected"
    assert collect.main([str(sweep_dir), "--out", str(out)]) == 0
    assert "3 jobs (2 ok, 1 failed)" in capsys.readouterr().out
    table = pd.read_csv(out / "sweep.csv", dtype={"override.personalisation.alpha": str})
    assert len(table) == 2 * 2 * 4 + 1  # 2 ok jobs x 2 inits x 4 exits + 1 failed row
    failed = table[table["status"] == "failed"]
    assert failed["job"].tolist() == [2]
    assert failed["error"].tolist() == ["ValueError: alpha must be >= 0, got -1"]
    assert failed["override.personalisation.alpha"].tolist() == ["-1"]
    first = table[(table["job"] == 1) & (table["init"] == "global") & (table["exit"] == 0)]
    assert first["accuracy_after_mean"].item() == pytest.approx((0.50 + 0.45 + 0.60) / 3 + 0.01)
    assert set(table["override.init"]) == {"global"} and "init" in table.columns
    markdown = (out / "sweep.md").read_text()
    assert "ValueError: alpha must be >= 0, got -1" in markdown and f"]({SWEEP_PNG})" in markdown
    assert (out / SWEEP_PNG).read_bytes()[:8] == PNG_SIGNATURE


def test_collect_job_without_summary_or_error_is_failed(sweep_dir):
    _fake_job(sweep_dir, 10, ["personalisation.alpha=5"])
    table = collect.collect_sweep(sweep_dir)
    assert table["job"].drop_duplicates().tolist() == [0, 1, 2, 10]  # numeric order
    assert "did not finish" in table.loc[table["job"] == 10, "error"].item()


@pytest.mark.parametrize("make_dir", [False, True], ids=["missing", "empty"])
def test_collect_bad_directory_is_a_one_line_error(tmp_path, capsys, make_dir):
    target = tmp_path / "nowhere"
    if make_dir:
        target.mkdir()
    assert collect.main([str(target)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "nowhere" in error and "Traceback" not in error


def test_collect_module_exit_code_and_no_flower_import(tmp_path):
    result = subprocess.run(
        [PYTHON, "-m", "fedexits.collect", str(tmp_path / "missing")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    check = (
        "import sys, fedexits.report, fedexits.collect; "
        "print([m for m in sys.modules if m.split('.')[0] == 'flwr' or m.startswith('fedexits.fl')])"
    )
    imported = subprocess.run([PYTHON, "-c", check], check=False, capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0 and imported.stdout.strip() == "[]"


def test_sweep_legend_keeps_only_what_differs_between_jobs():
    from fedexits.report.plots import _short_job_labels

    labels = [
        "0: +experiment=smoke, personalisation.alpha=0, personalisation.beta=1",
        "1: +experiment=smoke, personalisation.alpha=1, personalisation.beta=1",
        "2: +experiment=smoke, personalisation.alpha=1, federated.alpha=2",
    ]
    assert _short_job_labels(labels) == {
        labels[0]: "0: personalisation.alpha=0, beta=1",
        labels[1]: "1: personalisation.alpha=1, beta=1",
        labels[2]: "2: personalisation.alpha=1, federated.alpha=2",
    }
    assert _short_job_labels(["0: (no overrides)"]) == {"0: (no overrides)": "0: (no overrides)"}


def _lifecycle_summary(bonus: float) -> dict:
    """A lifecycle job's summary.json as the run writes it: policies from target_metrics on a
    tiny timeline (u0 drifts on day 1, u1 never)."""
    rows = [
        dict(user=user, day=day, policy=policy, accuracy=0.8 + bonus * (policy == "orchestrator"),
             final_accuracy=0.8, measured=10, mflops=20.0, drift_flagged=user == "u0" and day == 2,
             train_mflops=1000.0 * (policy == "nightly"))
        for user in ("u0", "u1") for day in range(3) for policy in ("nightly", "orchestrator")
    ]  # fmt: skip
    metrics = target_metrics(pd.DataFrame(rows), {"u0": 1, "u1": None}, full_mflops=40.0)
    meta = {"mode": "lifecycle", "status": {"status": "ok", "reason": ""}}
    return {"meta": meta, "policies": json.loads(json.dumps(metrics.reset_index().to_dict("records")))}


def test_collect_gives_lifecycle_jobs_one_row_per_policy(tmp_path):
    sweep = tmp_path / "multirun"
    for job, (p_expl, bonus) in enumerate([(0.1, 0.0), (0.3, -0.05)]):
        job_dir = _fake_job(sweep, job, ["+experiment=lifecycle", f"lifecycle.orchestrator.p_expl={p_expl}"])
        atomic_write_json(_lifecycle_summary(bonus), job_dir / "summary.json")
    out = tmp_path / "collected"
    assert collect.main([str(sweep), "--out", str(out)]) == 0
    table = pd.read_csv(out / "sweep.csv")
    assert len(table) == 2 * 2 and set(table.policy) == {"nightly", "orchestrator"}
    worse = table[(table.job == 1) & (table.policy == "orchestrator")]
    assert worse.drifted_gap_pp_mean.item() == pytest.approx(5.0)  # 5 pp below the final exit
    assert worse.drifted_flops_share.item() == pytest.approx(0.5) and worse.median_delay_days.item() == 1
    nightly = table[(table.job == 0) & (table.policy == "nightly")]
    assert nightly.steady_train_gflops_per_user.item() == pytest.approx(3.0)
    markdown = (out / "sweep.md").read_text()
    assert "## Lifecycle per job and policy" in markdown and "+5.00" in markdown
    assert "1: lifecycle.orchestrator.p_expl=0.3 |" in markdown  # only what the jobs vary
    assert "## Mean personalised accuracy per exit" not in markdown  # no one-shot job
    assert worse.drifted_flagged.item() == 1.0
    assert (out / LIFECYCLE_SWEEP_PNG).read_bytes()[:8] == PNG_SIGNATURE
