from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from fedexits.data.streams import DriftConfig, StreamConfig, user_stream
from fedexits.engine.calibration import THRESHOLDS, CalibrationConfig
from fedexits.engine.lifecycle import TIMING_COLUMNS, Lifecycle, run_day
from fedexits.engine.lifecycle_config import POLICIES, LifecycleConfig, check_buffer
from fedexits.engine.lifecycle_run import accuracy_vs_samples, average_exits, run_lifecycle
from fedexits.engine.orchestrator import STATISTICS, OrchestratorConfig
from fedexits.engine.personalise import PersonalisationConfig
from fedexits.engine.user_state import UserState
from fedexits.errors import SettingsError

from .lifecycle_helpers import SquaresPopulation, make_micro_model, square_dataset


@pytest.fixture(scope="module")
def population():
    # 300 images per user: 6 days x 40 inputs never recycle one; u1 is a very different "writer"
    return SquaresPopulation(num_users=3, images=300, noisy=("u1",))


# every input explored (40 a day): the CUSUM sees 40 inputs a day, so the alarm level is higher
TEST_RULES = {
    "p_expl": 1.0,
    "min_new_samples": 40,
    "min_new_share": None,  # the count rule alone, unless a test says otherwise
    "epochs": None,  # the personalisation config's
    "lr": None,  # the personalisation config's
    "min_reference": 8,
    "cusum_alarm": 40.0,
}
# per-user thresholds that move on a micro model's few samples (no shared threshold by default)
TEST_CALIBRATION = CalibrationConfig(rule="margin", drop_tolerance_pp=1.0, thresholds=THRESHOLDS)


def lifecycle(
    model,
    scenario="writer",
    policies=("orchestrator",),
    seed=0,
    batch_size=16,
    shared_threshold=None,
    own_threshold=False,
    **orchestrator,
):
    config = LifecycleConfig(
        policies=list(policies),
        seed=seed,
        buffer_size=96,
        shared_threshold=shared_threshold,
        own_threshold=own_threshold,
        once_days=1,
        stream=StreamConfig(days=6, inputs_per_day=40),
        drift=DriftConfig(scenario=scenario, share=1.0, first_day=3, last_day=3),
        orchestrator=OrchestratorConfig(**TEST_RULES | orchestrator),
    )
    personalisation = PersonalisationConfig(epochs=5, batch_size=batch_size)
    return Lifecycle(model, config, personalisation, decode, TEST_CALIBRATION)


def decode(images):
    return torch.from_numpy(images / np.float32(255))


def live(population, lc, user="u0", policy="orchestrator", days=None):
    stream = user_stream(population, user, lc.config.stream, lc.config.drift, lc.config.seed)
    state, records = lc.new_state(), []
    for day in range(days or lc.config.stream.days):
        records.append(run_day(policy, state, lc, stream.day(day)).record)
    return state, pd.DataFrame([r.to_dict() for r in records])


@pytest.mark.parametrize("statistic", STATISTICS)
def test_exploration_statistic_rises_under_drift_and_not_without(population, statistic):
    model = make_micro_model()
    _, drifted = live(population, lifecycle(model, "writer", statistic=statistic))  # u1 takes over on day 3
    _, steady = live(population, lifecycle(model, "none", statistic=statistic))
    before = drifted.loc[2]  # personalised and calibrated on nights 0-1: the reference is set
    drift_day = drifted.loc[3]
    calibrated = steady[steady.cusum.notna()]
    assert len(calibrated) >= 4
    assert drifted.drift_flagged.loc[3] and not steady.drift_flagged.any()
    if statistic == "feature_shift":  # the window's z, against the calibration samples' features
        alarm = OrchestratorConfig().shift_alarm  # the CUSUM of the windows' z
        assert drift_day.cusum > max(alarm, 3 * calibrated.cusum.max()) and before.cusum <= alarm
        return
    assert drift_day.explore_loss > 2.0 * drift_day.reference_loss
    assert drift_day.explore_loss > 2.0 * before.explore_loss
    assert drift_day.explore_loss > 2.0 * calibrated.explore_loss.max()
    assert drift_day.cusum > 3 * calibrated.cusum.max()


def test_threshold_raised_to_thr_prime_when_the_rule_fires(population):
    lc = lifecycle(make_micro_model(), "writer", raised_threshold=0.97, threshold_deviation=0.01)
    _, timeline = live(population, lc)
    flagged = timeline[timeline.drift_flagged]
    assert not timeline.loc[:2].drift_flagged.any()
    assert flagged.day.min() == 3  # caught on the day the phone changed hands
    first = flagged.iloc[0]
    assert first.threshold == 0.97 and first.calibrated_threshold < 0.96
    # personalisation is scheduled: the first night with a batch of samples since the drift
    after = timeline[timeline.day >= first.day]
    night = after[after.personalised].iloc[0]
    assert night.trigger == "drift" and night.train_samples > 0
    assert (after[after.day <= night.day].threshold == 0.97).all()  # raised until then


def test_shared_threshold_serves_from_the_first_day_and_a_drift_without_a_batch_resets(population):
    shared = 0.9
    settings = dict(batch_size=32, shared_threshold=shared, raised_threshold=0.97, threshold_deviation=0.01)
    settings |= dict(statistic="disagreement")  # a loss rule: it stays flagged the day after the drift
    # about 20 trainable inputs a day: the drift day alone is not a batch of 32
    _, kept = live(population, lifecycle(make_micro_model(), "writer", **settings))
    assert (kept.calibrated_threshold == shared).all() and kept.personalised.any()
    lc = lifecycle(make_micro_model(), "writer", own_threshold=True, **settings)
    state, timeline = live(population, lc)
    assert timeline.threshold.iloc[0] == shared and timeline.trigger.iloc[0] == ""  # no calibration yet
    assert (timeline.calibrated_threshold <= shared).all()  # a certificate may only lower it
    assert (timeline.calibrated_threshold < shared).any()
    assert timeline[timeline.drift_flagged].day.min() == 3
    # the drift night personalises on the samples since the CUSUM rose; still flagged the next
    # day, with fewer than a batch since then: back to the shared exits at the shared threshold
    resets = timeline[timeline.trigger == "reset"]
    assert len(resets) >= 1
    night = resets.iloc[0]
    assert night.drift_flagged and not night.personalised and night.train_samples == 0
    after = timeline.loc[night.day + 1]
    assert after.threshold <= shared and not after.drift_flagged
    assert lc.config.shared_threshold == shared and state.day == lc.config.stream.days


@pytest.mark.parametrize("on_drift, reset_exits", [(True, "shared"), (False, "shared"), (True, "kept")])
def test_a_reset_keeps_the_users_exits_unless_it_restarts_from_the_shared_ones(
    population, on_drift, reset_exits
):
    restart = on_drift and reset_exits == "shared"
    settings = dict(batch_size=48, shared_threshold=0.9, raised_threshold=0.97, threshold_deviation=0.01)
    settings |= dict(statistic="disagreement", restart_on_drift=on_drift, reset_exits=reset_exits)
    settings |= dict(own_threshold=True)
    lc = lifecycle(make_micro_model(), "writer", **settings)
    lc.personalisation = replace(lc.personalisation, guard=False)  # every head personalised
    _, timeline = live(population, lc)
    night = int(timeline[timeline.trigger == "reset"].day.iloc[0])
    before, _ = live(population, lc, days=night)
    after, _ = live(population, lc, days=night + 1)
    assert before.exits  # personalised heads before the drift
    if restart:
        assert after.exits is None
    else:
        assert after.exits.keys() == before.exits.keys()
        assert all(torch.equal(after.exits[n], before.exits[n]) for n in before.exits)
    assert after.threshold <= lc.config.shared_threshold and not after.drift_flagged


@pytest.mark.parametrize("broken", ["user", "shared"])
def test_a_better_reset_keeps_whichever_exits_score_higher_on_the_samples_since_the_drift(population, broken):
    settings = dict(batch_size=32, shared_threshold=0.9, raised_threshold=0.97, threshold_deviation=0.01)
    settings |= dict(statistic="disagreement", reset_exits="better", own_threshold=True)
    lc = lifecycle(make_micro_model(), "writer", **settings)
    _, timeline = live(population, lc)
    reset_day = int(timeline[timeline.trigger == "reset"].day.iloc[0])
    stream = user_stream(population, "u0", lc.config.stream, lc.config.drift, lc.config.seed)
    state = lc.new_state()
    for day in range(reset_day):
        run_day("orchestrator", state, lc, stream.day(day))
    # heads that answer one class whatever the input, against the trained shared heads
    trained = {n: t.clone() for n, t in lc.shared_exits.items()}
    zeroed = {n: torch.zeros_like(t) for n, t in trained.items()}
    if broken == "user":
        state.exits = zeroed
    else:
        state.exits, lc.shared_exits = trained, zeroed
    record = run_day("orchestrator", state, lc, stream.day(reset_day)).record
    assert record.trigger == "reset" and len(state.training_rows())  # samples to judge the exits on
    if broken == "user":
        assert state.exits is None  # back to the shared exits
    else:
        assert state.exits is trained
    # both sets of exits judged on the samples since the drift; the chosen set's pass calibrates
    assert record.train_mflops == pytest.approx(2 * lc.calibration_mflops(len(state.training_rows())))


def test_personalisation_skipped_when_the_data_rule_says_so(population):
    model = make_micro_model()
    _, patient = live(population, lifecycle(model, "none", min_new_samples=10_000))
    assert not patient.personalised.any()
    assert (patient.trigger == "calibrate").sum() == 1  # the shared exits, calibrated once
    _, eager = live(population, lifecycle(model, "none", min_new_samples=40))
    nights = eager[eager.personalised]
    assert len(nights) >= 2 and (nights.trigger == "data").all()
    assert (eager.train_mflops[eager.personalised] > 0).all()


def test_share_rule_personalises_once_new_samples_are_a_share_of_the_last_training_set(population):
    model = make_micro_model()
    never = dict(min_new_samples=10_000)  # the count rule alone never fires
    _, counted = live(population, lifecycle(model, "none", **never))
    _, shared = live(population, lifecycle(model, "none", **never, min_new_share=0.5))
    _, huge = live(population, lifecycle(model, "none", **never, min_new_share=100.0))
    assert not counted.personalised.any()
    nights = shared[shared.personalised]
    assert len(nights) >= 2 and (nights.trigger == "data").all()
    assert huge.personalised.sum() == 1  # the first night (nothing trained yet), then never again
    state = UserState(num_exits=2, image_shape=(1, 4, 4), new_samples=20, trained_samples=40)
    assert state.enough_new_samples(OrchestratorConfig(min_new_samples=30, min_new_share=0.5))
    assert not state.enough_new_samples(OrchestratorConfig(min_new_samples=30, min_new_share=0.6))
    assert not state.enough_new_samples(OrchestratorConfig(min_new_samples=30, min_new_share=None))


def test_orchestrator_epochs_train_longer_charge_it_and_leave_nightly_alone(population):
    model = make_micro_model()
    _, base = live(population, lifecycle(model, "none", min_new_samples=40))
    _, longer = live(population, lifecycle(model, "none", min_new_samples=40, epochs=10))
    nights = base.personalised
    assert nights.any() and nights.tolist() == longer.personalised.tolist()
    assert (longer.train_mflops[nights] > base.train_mflops[nights]).all()
    nightly = [
        live(population, lifecycle(model, "none", ("nightly",), epochs=e), policy="nightly")[1]
        for e in (None, 10)
    ]
    assert nightly[0].train_mflops.tolist() == nightly[1].train_mflops.tolist()


def test_orchestrator_lr_steps_its_nights_harder_at_the_same_charge_and_leaves_nightly_alone(population):
    # a fresh model per run: a Lifecycle takes the model's exits at its start as the shared ones
    base_state, base = live(population, lifecycle(make_micro_model(), "none", min_new_samples=40))
    fast_state, fast = live(population, lifecycle(make_micro_model(), "none", min_new_samples=40, lr=0.05))
    assert base.train_mflops.tolist() == fast.train_mflops.tolist() and base.train_mflops.sum() > 0
    assert base_state.exits and fast_state.exits
    assert any(not torch.equal(base_state.exits[k], fast_state.exits[k]) for k in base_state.exits)
    nightly = [
        live(population, lifecycle(make_micro_model(), "none", ("nightly",), lr=lr), policy="nightly")
        for lr in (None, 0.05)
    ]
    nightly = [state.exits for state, _ in nightly]
    assert nightly[0].keys() == nightly[1].keys()
    assert all(torch.equal(nightly[0][k], nightly[1][k]) for k in nightly[0])


def test_a_buffer_smaller_than_a_batch_never_personalises(population):
    lc = lifecycle(make_micro_model(), "none", policies=("nightly",), batch_size=32)
    _, timeline = live(population, lc, policy="nightly", days=4)
    # about 15 trainable inputs arrive a day: the first nights have fewer than a batch of 32
    assert timeline.personalised.tolist() == (timeline.buffered >= 32).tolist()
    assert timeline.personalised.iloc[-1] and not timeline.personalised.iloc[0]


def test_policies_see_identical_streams_and_the_fail_safe_never_changes(population):
    model = make_micro_model()
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("exits.")}
    x, _ = square_dataset(64, seed=5)
    final_before = model(x)[-1]
    lc = lifecycle(model, "writer", policies=POLICIES, min_new_samples=20)
    result = run_lifecycle(population, ["u0", "u2"], lc)
    timeline = result.timeline
    assert result.failures.empty and set(timeline.policy) == set(POLICIES)
    assert timeline.personalised.sum() >= 10
    per_input = timeline.pivot_table(index=["user", "day"], columns="policy", values="final_accuracy")
    assert (per_input.nunique(axis=1) == 1).all()  # same inputs, same fail-safe answers
    for column in ("inputs", "measured", "drift_active"):
        assert (timeline.groupby(["user", "day"])[column].nunique() == 1).all()
    after = model.state_dict()
    assert all(torch.equal(tensor, after[name]) for name, tensor in backbone.items())
    lc.load(None)
    assert torch.equal(final_before, model(x)[-1])  # bit-identical


def test_state_round_trips_through_arrays_exactly(population):
    lc = lifecycle(make_micro_model(), "none")
    stream = user_stream(population, "u0", lc.config.stream, lc.config.drift, lc.config.seed)
    state = lc.new_state()
    for day in range(3):
        run_day("orchestrator", state, lc, stream.day(day))
    assert state.exits is not None and state.buffered > 0 and state.explored > 0
    assert len(state.feature_mean) > 0 and len(state.feature_sd) == len(state.feature_mean)
    arrays, scalars = state.to_arrays()
    restored = UserState.from_arrays(arrays, scalars)
    again, scalars_again = restored.to_arrays()
    assert scalars_again == scalars and arrays.keys() == again.keys()
    for name, array in arrays.items():
        assert array.dtype == again[name].dtype and np.array_equal(array, again[name], equal_nan=True), name
    assert state.buffer_images.dtype == np.uint8
    # the next day is the same from the original and from the restored state
    a, b = (run_day("orchestrator", s, lc, stream.day(3)).record.to_dict() for s in (state, restored))
    a, b = (pd.DataFrame([r]).drop(columns=list(TIMING_COLUMNS)) for r in (a, b))
    pd.testing.assert_frame_equal(a, b)
    assert np.array_equal(state.buffer_images, restored.buffer_images)


def test_state_fits_flower_records(population):
    flwr = pytest.importorskip("flwr.common")
    lc = lifecycle(make_micro_model(), "none")
    state, _ = live(population, lc, days=3)
    arrays, scalars = state.to_arrays()
    array_record = flwr.ArrayRecord({k: flwr.Array(v) for k, v in arrays.items()})
    config_record = flwr.ConfigRecord(scalars)
    restored = UserState.from_arrays({k: v.numpy() for k, v in array_record.items()}, dict(config_record))
    assert restored.to_arrays()[1] == scalars
    assert all(np.array_equal(v, restored.to_arrays()[0][k]) for k, v in arrays.items())


def test_same_seed_same_timeline(population):
    runs = [
        run_lifecycle(population, ["u0"], lifecycle(make_micro_model(), "labels", POLICIES, seed))
        for seed in (0, 0, 1)
    ]
    a, b, c = (run.timeline.drop(columns=list(TIMING_COLUMNS)) for run in runs)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_average_exits_weights_by_samples():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(5)}
    average = average_exits([(a, 1), (b, 3)])
    assert torch.equal(average["w"], torch.tensor([3.0, 5.0])) and average["n"].item() == 3


def test_fedavg_users_start_from_the_servers_exits(population):
    model = make_micro_model()
    lc = lifecycle(model, "none", policies=("orchestrator+fedavg",))
    stream = user_stream(population, "u0", lc.config.stream, lc.config.drift, lc.config.seed)
    state = lc.new_state()
    server = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in lc.shared_exits.items()}
    outcomes = [run_day("orchestrator+fedavg", state, lc, stream.day(d), server) for d in range(3)]
    personalised = [o for o in outcomes if o.record.personalised]
    assert personalised and personalised[0].num_samples > 0
    # zero weights learn nothing useful: the guard keeps some exits at the server's zeros
    exits = personalised[0].exits
    assert any(torch.count_nonzero(exits[k]) == 0 for k in exits if k.endswith("linear.weight"))
    with pytest.raises(ValueError, match="orchestrator\\+fedavg only"):
        run_day("nightly", lc.new_state(), lc, stream.day(0), start_exits=server)


def test_accuracy_vs_samples_keeps_the_fail_safe_and_restores_the_exits():
    model = make_micro_model()
    shared = {k: v.clone() for k, v in model.exits.state_dict().items()}
    x, y = square_dataset(80, seed=3)
    x_test, y_test = square_dataset(60, seed=4)
    labelled = torch.ones(80, dtype=torch.bool)
    curve = accuracy_vs_samples(model, (x, y, labelled), (x_test, y_test), [0, 16, 64, 500])
    assert sorted(curve.n_samples.unique()) == [0, 16, 64]  # 500 > 80 samples: skipped
    final = curve[curve.exit == model.num_exits]
    assert final.accuracy.nunique() == 1
    assert all(torch.equal(v, model.exits.state_dict()[k]) for k, v in shared.items())


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: OrchestratorConfig(p_expl=1.5), "lifecycle.orchestrator.p_expl"),
        (lambda: OrchestratorConfig(p_expl=-0.1), "lifecycle.orchestrator.p_expl"),
        (lambda: StreamConfig(days=0), "lifecycle.stream.days"),
        (lambda: StreamConfig(inputs_per_day=0), "lifecycle.stream.inputs_per_day"),
        (lambda: LifecycleConfig(drift=DriftConfig(last_day=14)), "lifecycle.drift.last_day"),
        (lambda: LifecycleConfig(policies=["sometimes"]), "lifecycle.policies"),
        (lambda: LifecycleConfig(once_days=20, stream=StreamConfig(days=14)), "lifecycle.once_days"),
        (lambda: DriftConfig(scenario="earthquake"), "lifecycle.drift.scenario"),
        (lambda: OrchestratorConfig(statistic="entropy"), "lifecycle.orchestrator.statistic"),
        (lambda: OrchestratorConfig(statistic="disagreement", p_expl=0), "lifecycle.orchestrator.p_expl"),
        (lambda: OrchestratorConfig(shift_window=1), "lifecycle.orchestrator.shift_window"),
        (lambda: OrchestratorConfig(shift_test="mahalanobis"), "lifecycle.orchestrator.shift_test"),
        (lambda: OrchestratorConfig(min_new_share=0), "lifecycle.orchestrator.min_new_share"),
        (lambda: OrchestratorConfig(epochs=0), "lifecycle.orchestrator.epochs"),
        (lambda: OrchestratorConfig(lr=0), "lifecycle.orchestrator.lr"),
        (lambda: LifecycleConfig(shared_threshold=1.5), "lifecycle.shared_threshold"),
        (
            lambda: LifecycleConfig(
                orchestrator=OrchestratorConfig(raised_threshold=0.85, threshold_deviation=0.1)
            ),
            "lifecycle.orchestrator.raised_threshold",
        ),
        (
            lambda: check_buffer(LifecycleConfig(buffer_size=16), PersonalisationConfig(batch_size=32)),
            "lifecycle.buffer_size",
        ),
        (lambda: run_day("sometimes", None, None, None), "policy"),
    ],
)
def test_bad_settings_give_one_line(make, name):
    with pytest.raises(SettingsError) as error:
        make()
    message = str(error.value)
    assert message.startswith(name) and "\n" not in message
