"""Lifecycle mode: per-policy state in Flower records, the report, the command line's one-line
errors, and an end-to-end Flower run of two days (two server rounds) in which every user's state
must come back through Context.state."""

import json

import numpy as np
import pandas as pd
import pytest
from flwr.app import RecordDict

from fedexits.data import build_population
from fedexits.engine.lifecycle_config import POLICIES
from fedexits.errors import SettingsError
from fedexits.fl.lifecycle_client import load_states, save_states
from fedexits.report.lifecycle import (
    TIMELINE_COLUMNS,
    detection_delays,
    target_metrics,
    write_lifecycle_report,
)
from fedexits.study import compose_config
from fedexits.study.plan import lifecycle_partition_users

from .lifecycle_helpers import make_micro_model
from .test_lifecycle import lifecycle, live, population  # noqa: F401 (fixture)
from .test_simulate import TINY, cache_env, run_cli


def test_states_and_failed_policies_survive_flower_records(population):  # noqa: F811
    lc = lifecycle(make_micro_model(), "none", policies=("nightly", "orchestrator"))
    states = {p: live(population, lc, policy=p, days=3)[0] for p in ("nightly", "orchestrator")}
    record = RecordDict()
    save_states(record, states, {"once"})
    restored, failed = load_states(record, POLICIES)
    assert failed == {"once"} and restored.keys() == states.keys()
    for policy, state in states.items():
        arrays, scalars = state.to_arrays()
        again, scalars_again = restored[policy].to_arrays()
        assert scalars_again == scalars
        assert all(np.array_equal(a, again[k], equal_nan=True) for k, a in arrays.items())
    assert load_states(RecordDict(), POLICIES) == ({}, set())  # a new user


def _timeline():
    """Two users, four days; u1 drifts on day 2 and the orchestrator flags it on day 3."""
    rows = []
    for user, drift in (("u0", None), ("u1", 2)):
        for day in range(4):
            for policy, acc, flagged, train in (
                ("nightly", 0.9, False, 100.0),
                ("orchestrator", 0.88, drift is not None and day >= 3, 20.0 * (day == 0)),
            ):
                active = drift is not None and day >= 2
                rows.append(
                    dict(user=user, day=day, policy=policy, accuracy=acc, final_accuracy=0.9, mflops=5.0,
                         latency_ms=1.0, threshold=0.8, drift_active=active, drift_flagged=flagged,
                         personalised=train > 0, train_mflops=train, measured=10)
                )  # fmt: skip
    return pd.DataFrame(rows)


def test_targets_and_delays_from_a_timeline():
    timeline, drift_days = _timeline(), {"u0": None, "u1": 2}
    delays = detection_delays(timeline[timeline.policy == "orchestrator"], drift_days)
    assert delays.to_dict() == {"u1": 1.0}
    metrics = target_metrics(timeline, drift_days, full_mflops=10.0)
    assert metrics.loc["orchestrator", "drifted_gap_pp_mean"] == pytest.approx(2.0)
    assert metrics.loc["orchestrator", "drifted_within_2pp"] == 1.0
    assert metrics.loc["orchestrator", "drifted_flops_share"] == pytest.approx(0.5)
    assert metrics.loc["nightly", "steady_train_gflops_per_user"] == pytest.approx(0.4)
    assert metrics.loc["orchestrator", "steady_train_gflops_per_user"] == pytest.approx(0.02)


FIG4 = pd.DataFrame(
    dict(user="u0", n_samples=[0, 0, 10, 10], exit=[0, 1, 0, 1], accuracy=[0.5, 0.9, 0.6, 0.9])
)


def _meta(scenario: str) -> dict:
    return {
        "status": {"status": "ok", "reason": "", "users_total": 2, "users_failed": 0},
        "full_mflops": 10.0,
        "lifecycle": {"stream": {"days": 4, "inputs_per_day": 10, "label_fraction": 1.0},
                      "drift": {"scenario": scenario, "share": 0.5, "first_day": 2, "last_day": 2},
                      "buffer_size": 64, "orchestrator": {"min_new_samples": 60}},
    }  # fmt: skip


def test_report_of_a_run_without_any_drift(tmp_path):
    timeline = _timeline()
    timeline["drift_active"] = timeline["drift_flagged"] = False
    no_drift = {"u0": None, "u1": None}
    metrics = target_metrics(timeline, no_drift, full_mflops=10.0)
    assert metrics.loc["nightly", "steady_users"] == 2 and "drifted_users" not in metrics.columns
    write_lifecycle_report(tmp_path, timeline, pd.DataFrame(), FIG4, no_drift, _meta("none"))
    report = (tmp_path / "report.md").read_text()
    assert "; no drift;" in report and "median delay from drift to drift_flagged <= 2 days | n/a" in report


def test_report_writes_every_file(tmp_path):
    timeline = _timeline()
    failures = pd.DataFrame([dict(user="u2", day=1, policy="nightly", error="bad labels")])
    summary = write_lifecycle_report(
        tmp_path, timeline, failures, FIG4, {"u0": None, "u1": 2}, _meta("writer")
    )
    report = (tmp_path / "report.md").read_text()
    assert "| u2 | 1 | nightly | bad labels |" in report
    assert "drift `writer` for a seeded 50% of users on a day in [2, 2]" in report
    assert "median delay from drift to drift_flagged <= 2 days | 1.0 | yes" in report
    for name in ("lifecycle_over_days.png", "lifecycle_drift_delay.png", "lifecycle_fig4.png",
                 "lifecycle_compute_vs_accuracy.png", "lifecycle_targets.csv"):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 0, name
    assert {p["policy"] for p in summary["policies"]} == {"nightly", "orchestrator"}
    json.dumps(summary)


@pytest.mark.parametrize(
    "override, name",
    [
        ("lifecycle.orchestrator.p_expl=1.2", "lifecycle.orchestrator.p_expl"),
        ("lifecycle.stream.days=0", "lifecycle.stream.days"),
        ("lifecycle.stream.inputs_per_day=0", "lifecycle.stream.inputs_per_day"),
        ("lifecycle.drift.last_day=14", "lifecycle.drift.last_day"),
        ("lifecycle.buffer_size=16", "lifecycle.buffer_size"),
        ("lifecycle.shared_threshold=-0.2", "lifecycle.shared_threshold"),
        ("personalisation.method=full", "personalisation.method"),
    ],
)
def test_bad_lifecycle_settings_give_one_line(override, name):
    with pytest.raises(SettingsError) as error:
        compose_config(["+experiment=lifecycle", override])
    assert str(error.value).startswith(name) and "\n" not in str(error.value)


def test_two_days_through_flower_keep_each_users_state_in_context(tmp_path):
    """Two server rounds (days). A state lost between rounds would start again at day 0 (the
    worker refuses: a bug), or show an empty buffer on day 1. Only the sampled users are virtual
    clients: server and clients must agree on which partition is which user."""
    env = cache_env(tmp_path / "cache")
    out = tmp_path / "run"
    overrides = [
        "mode=lifecycle",
        "dataset.num_writers=9",  # 4 global writers: the global model only needs to exist
        "simulation.num_users=3",  # of 5 held-out users
        "simulation.max_failed_fraction=0.5",
        "global_training.epochs=1",
        "lifecycle.stream.days=2",
        "lifecycle.stream.inputs_per_day=16",
        "lifecycle.once_days=1",
        "lifecycle.drift.first_day=1",
        "lifecycle.drift.last_day=1",
        "lifecycle.fig4_users=1",
        "lifecycle.fig4_counts=[0,8]",
        "personalisation.batch_size=4",
        "personalisation.epochs=2",
    ]
    run_cli(TINY + overrides + [f"hydra.run.dir={out}"], env)
    timeline = pd.read_csv(out / "timeline.csv")
    assert list(timeline.columns) == TIMELINE_COLUMNS
    assert set(timeline.policy) == set(POLICIES) and set(timeline.day) == {0, 1}
    settings = compose_config(TINY + overrides + [f"cache_dir={env['FEDEXITS_CACHE_DIR']}"])
    sampled = lifecycle_partition_users(build_population(settings.dataset), 3, settings.seed)
    assert sorted(set(timeline.user)) == sorted(sampled) and len(sampled) == 3
    details = pd.read_csv(out / "lifecycle_details.csv")
    healthy = details
    assert healthy.groupby(["user", "policy"]).day.nunique().eq(2).all()
    nightly = healthy[healthy.policy == "nightly"].pivot_table(index="user", columns="day", values="buffered")
    assert (nightly[1] > nightly[0]).all()  # day 1 added to the buffer day 0 left in Context.state
    state = healthy[healthy.policy == "nightly"].pivot_table(
        index="user", columns="day", values="state_bytes"
    )
    assert (state[0] > 0).all() and (state[1] > state[0]).all()  # the buffer is most of it
    assert "Largest per-user state kept in Context.state" in (out / "report.md").read_text()
    assert healthy[(healthy.policy == "nightly") & (healthy.day == 0)].personalised.all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["status"]["status"] == "ok"
