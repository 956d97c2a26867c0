"""The Orchestrator's rules on one user's state (no model, no stream): the drift statistics, the
CUSUM and what a recalibration resets."""

import numpy as np
import torch

from fedexits.engine.features import _pool
from fedexits.engine.orchestrator import OrchestratorConfig, served_disagreement
from fedexits.engine.shift_tests import hotelling_z
from fedexits.engine.user_state import UserState


def test_diagonal_feature_shift_z_is_standard_without_a_shift_and_large_with_one():
    rng = np.random.default_rng(0)
    scale = np.array([0.1, 1.0, 5.0, 20.0, 3.0, 0.5])  # channels on very different scales
    mixing = np.eye(6) + 0.8 * np.eye(6, k=1)  # correlated neighbours: fewer effective channels
    draw = lambda n, shift=0.0: (rng.normal(size=(n, 6)) @ mixing + shift) * scale + 3.0  # noqa: E731
    state = UserState(2, (1, 4, 4))
    state.set_feature_reference(draw(200), "diagonal")
    assert 1.5 < state.feature_dof < 6
    window, z = 20, []
    for _ in range(300):
        state.window_features = state.window_features[:0]
        z.append(state.observe_features(draw(window), window, slack=100.0))
    z = np.array(z)
    assert abs(z.mean()) < 0.75 and 0.6 < z.std() < 1.6  # about standard without a shift (one reference)
    assert state.cusum == 0.0  # below the slack: nothing accumulates
    shifted = state.observe_features(draw(window, shift=1.0), window, slack=100.0)  # one sd, every channel
    assert shifted > 3 * z.max()


def test_feature_shift_grid_sees_a_shift_that_the_spatial_mean_hides():
    # ink moves from the left half of the feature map to the right: every channel's mean over
    # space is unchanged, each half's is not
    rng = np.random.default_rng(2)
    draw = lambda n: torch.tensor(rng.normal(size=(n, 3, 4, 4)))  # noqa: E731
    moved = torch.zeros(1, 3, 4, 4)
    moved[..., :2], moved[..., 2:] = -1.0, 1.0
    assert torch.allclose(_pool(moved, 1), torch.zeros(1, 3))
    assert _pool(draw(5), 2).shape == (5, 12)
    z = {}
    for grid in (1, 2):
        state = UserState(2, (1, 4, 4))
        state.set_feature_reference(_pool(draw(200), grid).numpy())
        z[grid] = state.observe_features(_pool(draw(20) + moved, grid).numpy(), 20, slack=100.0)
    assert z[1] < 4 < z[2]


def test_hotelling_z_is_standard_without_a_shift_even_on_few_calibration_samples():
    # the diagonal test's spreads come from the calibration samples alone; the Hotelling test's
    # F law accounts for them, so a small reference does not widen z's tails
    rng = np.random.default_rng(4)
    mixing = np.eye(8) + 0.9 * np.eye(8, k=1)
    draw = lambda n: rng.normal(size=(n, 8)) @ mixing * np.arange(1, 9)  # noqa: E731
    for m in (10, 200):
        z = []
        for _ in range(300):
            reference = draw(m)
            z.append(hotelling_z(draw(20), reference.mean(0), np.cov(reference.T), m))
        z = np.array(z)
        assert abs(z.mean()) < 0.2 and 0.8 < z.std() < 1.2 and z.max() < 4.5, (m, z.mean(), z.std(), z.max())
    constant = np.ones((30, 8))  # blank inputs: no feature varies, nothing to test
    assert np.isnan(hotelling_z(constant[:20] + 1.0, constant.mean(0), np.cov(constant.T), 30))


def test_hotelling_sees_a_shift_against_the_correlations_that_the_diagonal_test_misses():
    # two features that move together; the window moves them apart by 0.3 sd each
    rng = np.random.default_rng(5)
    mixing = np.array([[1.0, 0.95], [0.0, 0.31]])  # correlation 0.95
    draw = lambda n, shift=0.0: rng.normal(size=(n, 2)) @ mixing + shift * np.array([1.0, -1.0])  # noqa: E731
    reference, window = draw(200), draw(20, shift=0.3)
    z = {}
    for test in ("diagonal", "hotelling"):
        state = UserState(2, (1, 4, 4))
        state.set_feature_reference(reference, test)
        z[test] = state.observe_features(window, 20, slack=100.0)
    assert z["diagonal"] < 2 < 4 < z["hotelling"], z


def test_feature_shift_cusum_accumulates_a_persistent_moderate_shift():
    rng = np.random.default_rng(1)
    draw = lambda n, shift=0.0: rng.normal(size=(n, 8)) + shift  # noqa: E731
    config = OrchestratorConfig(shift_slack=2.0, shift_alarm=10.0)
    state = UserState(2, (1, 4, 4), calibrated=True, active_exits=[True, False])
    state.set_feature_reference(draw(400))
    state.day = 3
    z = state.observe_features(draw(20, shift=0.4), 20, config.shift_slack)
    assert config.shift_slack < z < config.shift_slack + config.shift_alarm  # one window: no alarm
    assert not state.drift_rule(config) and state.cusum_start_day == 3
    state.day = 4
    for _ in range(6):  # the shift stays: the excess over the slack adds up
        state.observe_features(draw(5, shift=0.4), 20, config.shift_slack)
    assert state.drift_rule(config)
    state.flag_drift(config)
    assert state.train_from_day == 3  # from the window that first rose above the slack
    state.recalibrated(0.5, [True, False], np.zeros(0))
    assert state.cusum == 0.0 and not state.drift_rule(config)


def test_a_calibration_without_samples_leaves_the_feature_rule_waiting():
    # a reset the night after a drift flag, when no sample arrived since the drift began (a
    # writer whose trainable images have all arrived): the old reference must not be used
    rng = np.random.default_rng(3)
    config = OrchestratorConfig()
    state = UserState(2, (1, 4, 4), calibrated=True, active_exits=[True, False])
    state.set_feature_reference(rng.normal(size=(50, 8)))
    state.recalibrated(0.8, [True, True], np.zeros(0))
    for _ in range(10):
        assert np.isnan(state.observe_features(rng.normal(size=(5, 8)) + 3.0, 20, config.shift_slack))
    assert state.cusum == 0.0 and not state.drift_rule(config)
    state.set_feature_reference(rng.normal(size=(50, 8)))  # the next calibration: watched again
    state.observe_features(rng.normal(size=(20, 8)) + 3.0, 20, config.shift_slack)
    assert state.drift_rule(config)


def test_served_disagreement_counts_the_answers_that_differ_from_the_final_exit():
    # 2 early exits + final, 4 inputs, 3 classes
    probs = torch.tensor(
        [
            [[0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]],  # exit 0
            [[0.1, 0.8, 0.1], [0.1, 0.85, 0.05], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],  # exit 1
            [[0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1]],  # final
        ]
    )
    # at 0.75: input 0 leaves at exit 0 (class 0, final says 1), input 1 at exit 1 (agrees),
    # input 2 at exit 1 (agrees), input 3 at exit 0 (class 2, final says 0)
    assert served_disagreement(probs, 0.75, [True, True]).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert served_disagreement(probs, 0.75, [False, True]).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert served_disagreement(probs, 1.0, [True, True]).tolist() == [0.0] * 4  # the final exit serves


def test_drift_rule_and_threshold_on_synthetic_losses():
    config = OrchestratorConfig(cusum_slack=0.5, cusum_alarm=4.0, raised_threshold=0.9)
    state = UserState(num_exits=2, image_shape=(1, 4, 4))
    rng = np.random.default_rng(0)
    state.recalibrated(0.4, [True, False], np.abs(rng.normal(1.0, 0.5, 40)))
    state.day = 5
    state.explore(np.abs(rng.normal(1.0, 0.5, 60)), config.cusum_slack)  # no drift: S stays low
    assert state.cusum < 2.0 and not state.drift_rule(config)
    state.recalibrated(0.4, [True, False], np.abs(rng.normal(1.0, 0.5, 40)))
    state.day = 6
    state.explore(np.full(1, 3.0), config.cusum_slack)  # one bad input is not a drift
    assert not state.drift_rule(config)
    state.explore(np.full(3, 2.0), config.cusum_slack)  # the loss stays higher: drift
    assert state.drift_rule(config)
    state.flag_drift(config)
    assert state.threshold == 0.9 and state.calibrated_threshold == 0.4
    assert state.train_from_day == 6  # where the CUSUM started rising
    few = UserState(num_exits=2, image_shape=(1, 4, 4))
    few.recalibrated(0.4, [True, True], np.abs(rng.normal(1.0, 0.5, 5)))  # too small a reference
    few.explore(np.full(20, 3.0), config.cusum_slack)
    assert not few.drift_rule(config)
