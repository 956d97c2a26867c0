import math

import pandas as pd
import pytest
import torch

from fedexits.engine import THRESHOLDS, CalibrationConfig, ExitCosts, calibrate, pareto_front, sweep
from fedexits.engine.calibration import apply_calibration
from fedexits.engine.risk_control import (
    drop_p_value_table,
    drop_p_values,
    fixed_sequence,
)
from fedexits.errors import SettingsError


def costs_table(backbone, heads):
    return pd.DataFrame({"backbone_mflops": backbone, "head_mflops": heads})


def one_hot_probs(confidences, predictions, num_classes=10):
    """(M+1, N, C) probabilities with the given top-1 confidence and class per exit/sample."""
    conf = torch.as_tensor(confidences, dtype=torch.float64)
    pred = torch.as_tensor(predictions)
    rest = (1 - conf) / (num_classes - 1)
    probs = rest[..., None].repeat(1, 1, num_classes)
    probs.scatter_(-1, pred[..., None], conf[..., None])
    return probs


def test_sweep_shares_accuracy_and_cost_by_hand():
    # 2 early exits + final, 4 samples
    probs = one_hot_probs(
        [[0.9, 0.4, 0.4, 0.4], [0.5, 0.8, 0.5, 0.5], [0.6, 0.6, 0.6, 0.6]],
        [[0, 1, 1, 1], [0, 1, 2, 2], [0, 1, 2, 0]],
    )
    targets = torch.tensor([0, 1, 2, 2])
    flops = ExitCosts([1.0, 2.0, 4.0], [0.5, 0.5, 0.1])
    table = sweep(probs, targets, flops, [True, True], thresholds=[0.0, 0.45, 0.7, 1.0]).set_index(
        "threshold"
    )
    # t=0: everyone leaves at exit 0 -> predictions 0,1,1,1 -> 2 of 4 right; cost 1.5 each
    assert table.loc[0.0, "accuracy"] == 0.5 and table.loc[0.0, "expected_mflops"] == 1.5
    # t=0.45: s0 exit0 (0.9), s1..s3 exit1 (0.8, 0.5, 0.5) -> preds 0,1,2,2 all right
    assert table.loc[0.45, "accuracy"] == 1.0
    assert table.loc[0.45, "expected_mflops"] == pytest.approx((1.5 + 3 * 3.0) / 4)
    # t=0.7: s0 exit0, s1 exit1, s2 s3 final (pred 2, 0) -> 3 of 4
    assert table.loc[0.7, "share_exit_2"] == 0.5 and table.loc[0.7, "accuracy"] == 0.75
    assert table.loc[0.7, "expected_mflops"] == pytest.approx((1.5 + 3.0 + 2 * 5.1) / 4)
    # t=1: everyone at the final, having run both heads
    assert table.loc[1.0, "share_exit_2"] == 1.0 and table.loc[1.0, "expected_mflops"] == pytest.approx(5.1)


def test_calibrate_picks_smallest_threshold_within_tolerance():
    n = 100
    # exit 0: confident and right on the first 80 samples, unsure elsewhere
    conf0 = [0.95] * 80 + [0.3] * 20
    pred0 = [1] * 80 + [0] * 20
    probs = one_hot_probs([conf0, [0.5] * n], [pred0, [1] * n])
    targets = torch.tensor([1] * n)
    table = costs_table([1.0, 10.0], [0.1, 0.0])
    result = calibrate(probs, targets, table, rule="plain", drop_tolerance_pp=1.0)
    # any threshold in [0.3, 0.95) keeps 100 %; the smallest grid point above 0.3 is 0.3
    # (0.3 > 0.3 is false, so the 20 unsure samples go to the final exit) -> exactly 0.3
    assert result.threshold == 0.3 and result.accuracy == 1.0 and result.final_accuracy == 1.0
    assert result.expected_mflops == pytest.approx(0.8 * 1.1 + 0.2 * 10.1)
    assert result.speedup == pytest.approx(10.0 / result.expected_mflops)
    # zero tolerance with a final exit that is worse: the same threshold still qualifies
    assert calibrate(probs, targets, table, rule="plain", drop_tolerance_pp=0.0).threshold == 0.3


def test_tolerance_trades_accuracy_for_cost():
    # exit 0 is right on 97 of 100 at confidence 0.6, final is always right
    probs = one_hot_probs([[0.6] * 100, [0.9] * 100], [[1] * 97 + [0] * 3, [1] * 100])
    targets = torch.ones(100, dtype=torch.long)
    table = costs_table([1.0, 10.0], [0.1, 0.0])
    strict = calibrate(probs, targets, table, rule="plain", drop_tolerance_pp=1.0)
    loose = calibrate(probs, targets, table, rule="plain", drop_tolerance_pp=5.0)
    assert strict.active_exits == [False] and strict.accuracy == 1.0  # exit 0 only costs
    assert loose.threshold == 0.0 and loose.accuracy == 0.97 and loose.speedup == pytest.approx(10 / 1.1)


def test_exits_that_never_help_are_pruned():
    # exit 0 is never confident; exit 1 is confident and right
    probs = one_hot_probs([[0.2] * 10, [0.9] * 10, [0.9] * 10], [[0] * 10, [1] * 10, [1] * 10])
    targets = torch.ones(10, dtype=torch.long)
    table = costs_table([1.0, 2.0, 10.0], [0.5, 0.5, 0.0])
    result = calibrate(probs, targets, table, rule="plain")
    assert result.active_exits == [False, True]
    assert result.thresholds() == [None, result.threshold]
    assert result.expected_mflops == pytest.approx(2.5)  # exit 0's head no longer runs
    assert calibrate(probs, targets, table, rule="plain", prune_exits=False).expected_mflops == pytest.approx(
        3.0
    )


def test_without_labels_accuracy_is_agreement_with_the_final_exit():
    probs = one_hot_probs([[0.9] * 4, [0.9] * 4], [[0, 1, 2, 0], [0, 1, 2, 2]])
    result = calibrate(
        probs, None, costs_table([1.0, 10.0], [0.1, 0.0]), rule="plain", drop_tolerance_pp=30.0
    )
    assert result.final_accuracy == 1.0 and result.accuracy == 0.75 and result.threshold == 0.0


def test_pareto_front_drops_dominated_points():
    table = pd.DataFrame({"expected_mflops": [1, 2, 3, 4], "accuracy": [0.5, 0.4, 0.8, 0.8]})
    assert pareto_front(table)["expected_mflops"].tolist() == [1, 3]


def test_apply_calibration_on_another_set():
    probs = one_hot_probs([[0.9, 0.1], [0.9, 0.9]], [[0, 0], [0, 1]])
    result = calibrate(probs, torch.tensor([0, 1]), costs_table([1.0, 10.0], [0.1, 0.0]), rule="plain")
    row = apply_calibration(probs, torch.tensor([0, 0]), result, costs_table([1.0, 10.0], [0.1, 0.0]))
    assert row["accuracy"] == 0.5


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            {"drop_tolerance_pp": -1},
            r"calibration.drop_tolerance_pp must be in \[0, 100\) percentage points, got -1",
        ),
        (
            {"thresholds": [0.5, 1.2]},
            r"calibration.thresholds must be a non-empty list of numbers in \[0, 1\]",
        ),
        ({"thresholds": []}, "calibration.thresholds must be a non-empty list"),
        ({"rule": "magic"}, "calibration.rule must be one of plain, margin, ltt, got 'magic'"),
        ({"confidence": 1.0}, r"calibration.confidence must be in \(0, 1\), got 1.0"),
        ({"margin_z": -1}, "calibration.margin_z must be >= 0 standard errors, got -1"),
    ],
)
def test_bad_calibration_settings(setting, message):
    with pytest.raises(SettingsError, match=message):
        CalibrationConfig(**setting)
    probs = one_hot_probs([[0.9], [0.9]], [[0], [0]])
    with pytest.raises(SettingsError, match=message):
        calibrate(probs, None, costs_table([1.0, 10.0], [0.1, 0.0]), **setting)


def test_margin_rejects_thresholds_that_win_on_luck():
    # 20 calibration samples; at threshold 0 exit 0 loses 2 and gains 2 against the final exit:
    # zero measured drop, but with a standard error of sqrt(4)/20 = 10 pp
    conf0 = [0.9] * 20
    pred0 = [0, 0] + [1, 1] + [1] * 16  # wrong on 0-1, right on 2-3 (final is wrong there)
    final = [1, 1] + [0, 0] + [1] * 16
    probs = one_hot_probs([conf0, [0.9] * 20], [pred0, final])
    targets = torch.ones(20, dtype=torch.long)
    table = costs_table([1.0, 10.0], [0.1, 0.0])
    lucky = calibrate(probs, targets, table, rule="margin", drop_tolerance_pp=1.0, margin_z=0.0)
    assert lucky.threshold == 0.0 and lucky.accuracy == lucky.final_accuracy
    careful = calibrate(probs, targets, table, rule="margin", drop_tolerance_pp=1.0, margin_z=1.0)
    assert careful.active_exits == [False]  # the exit cannot be trusted: it is switched off
    # the exact test needs more evidence than that (two gains and no loss would do at n=20)
    assert calibrate(probs, targets, table, rule="ltt", **ONE_PP_FULL_GRID).active_exits == [False]


# --- defects of the threshold grid -------------------------------------------------------------


@pytest.mark.parametrize("rule", ["plain", "margin", "ltt"])
def test_grid_without_one_keeps_the_final_exit_when_nothing_qualifies(rule):
    # exit 0 is confident and wrong wherever the final exit is right: no threshold below 0.95 is safe
    probs = one_hot_probs([[0.9] * 40, [0.9] * 40], [[1] * 40, [0] * 40])
    targets = torch.zeros(40, dtype=torch.long)
    result = calibrate(probs, targets, costs_table([1.0, 10.0], [0.1, 0.0]), rule=rule, thresholds=[0.0, 0.5])
    assert result.active_exits == [False] and result.accuracy == result.final_accuracy == 1.0
    assert result.speedup == 1.0 and result.threshold == 0.5


def test_unsorted_grid_picks_what_the_sorted_grid_picks():
    # exit 0: right at confidence 0.95 on 80 samples, wrong at 0.6 on 20; the final is always right
    probs = one_hot_probs([[0.95] * 80 + [0.6] * 20, [0.9] * 100], [[0] * 80 + [1] * 20, [0] * 100])
    targets = torch.zeros(100, dtype=torch.long)
    table = costs_table([1.0, 10.0], [0.1, 0.0])
    grid = [0.0, 0.5, 0.7, 0.9, 1.0]
    for rule in ("plain", "margin"):
        assert calibrate(probs, targets, table, rule=rule, thresholds=grid).threshold == 0.7
        assert calibrate(probs, targets, table, rule=rule, thresholds=grid[::-1]).threshold == 0.7
        assert calibrate(probs, targets, table, rule=rule, thresholds=[0.7, 1.0, 0.0, 0.7]).threshold == 0.7


# --- the exact test and Learn-then-Test -------------------------------------------------------


def trinomial_pmf(n, p_loss, p_gain):
    """(P, n+1, n+1) probabilities of (losses, gains) in n paired samples, for P parameter pairs."""
    p_loss, p_gain = (torch.as_tensor(p, dtype=torch.float64).reshape(-1, 1, 1) for p in (p_loss, p_gain))
    losses = torch.arange(n + 1, dtype=torch.float64)[:, None]
    gains = torch.arange(n + 1, dtype=torch.float64)[None, :]
    ties = (n - losses - gains).clamp(min=0)
    log_pmf = (
        math.lgamma(n + 1)
        - torch.lgamma(losses + 1)
        - torch.lgamma(gains + 1)
        - torch.lgamma(ties + 1)
        + torch.xlogy(losses, p_loss)
        + torch.xlogy(gains, p_gain)
        + torch.xlogy(ties, 1 - p_loss - p_gain)
    )
    return torch.where(losses + gains <= n, log_pmf.exp(), torch.zeros(()))


@pytest.mark.parametrize("n, tolerance", [(20, 0.01), (60, 0.01), (60, 0.05)])
def test_exact_p_values_are_valid_anywhere_in_the_null(n, tolerance):
    """P(p <= delta) <= delta, computed exactly (not by simulation), at nuisance values off the
    grid the p-values were maximised over and inside the null (drop above the tolerance)."""
    table = drop_p_value_table(n, tolerance)
    p_gain = torch.linspace(0, (1 - tolerance) / 2 - 0.02, 157).repeat(2)
    p_loss = p_gain + tolerance + torch.tensor([0.0, 0.02]).repeat_interleave(157)
    pmf = trinomial_pmf(n, p_loss, p_gain)
    for delta in (0.05, 0.1, 0.2):
        size = float((pmf * (table <= delta)).sum(dim=(1, 2)).max())
        assert size <= delta + 1e-3, (n, tolerance, delta, size)
        assert size > delta / 4  # and not trivially conservative


def test_gains_are_what_certify_a_small_drop():
    # 1 pp at 90%: losses alone cannot be certified below ~230 samples, gains can
    assert drop_p_values([0], [0], 140, 0.01)[0] > 0.1 and drop_p_values([0], [0], 300, 0.01)[0] <= 0.1
    p30 = drop_p_values([0, 0, 1, 1], [1, 2, 3, 4], 30, 0.01)
    assert p30[0] > 0.1 >= p30[1] and p30[2] > 0.1 >= p30[3]
    assert drop_p_values([0], [1], 140, 0.01)[0] <= 0.1
    # more losses or fewer gains never make the evidence stronger
    table = drop_p_value_table(30, 0.01)
    for losses in range(30):
        for gains in range(30 - losses):
            assert table[losses + 1, gains] >= table[losses, gains] - 1e-12
            assert table[losses, gains] >= table[losses, gains + 1] - 1e-12


def test_fixed_sequence_stops_at_the_first_hypothesis_it_cannot_reject():
    assert fixed_sequence([0.01, 0.05, 0.3, 0.01], 0.1).tolist() == [True, True, False, False]
    assert fixed_sequence([0.5, 0.0], 0.1).tolist() == [False, False]


def ltt_user(top_gains, mid_losses):
    """One early exit and 60 samples: 30 at confidence 0.97 (`top_gains` of them gains: exit
    right, final wrong), 10 at 0.7 and 20 at 0.6 (`mid_losses` of them losses: exit wrong,
    final right); both exits are right on every other sample."""
    conf = [0.97] * 30 + [0.7] * 10 + [0.6] * 20
    exit_right = [True] * 40 + [False] * mid_losses + [True] * (20 - mid_losses)
    final_right = [False] * top_gains + [True] * (60 - top_gains)
    probs = one_hot_probs(
        [conf, [0.9] * 60], [[0 if r else 1 for r in exit_right], [0 if r else 1 for r in final_right]]
    )
    return probs, torch.zeros(60, dtype=torch.long)


ONE_PP_FULL_GRID = dict(drop_tolerance_pp=1.0, thresholds=THRESHOLDS)


def test_ltt_certifies_thresholds_from_the_top_and_picks_the_cheapest():
    table = costs_table([1.0, 10.0], [0.1, 0.0])
    probs, targets = ltt_user(top_gains=3, mid_losses=3)
    result = calibrate(probs, targets, table, rule="ltt", confidence=0.9, **ONE_PP_FULL_GRID)
    # thresholds in [0.6, 0.95] let the 30 (>= 0.7: 40) confident samples leave: 3 gains, no
    # loss, certified; 0.6 and 0.65 cost the same, and ties go to the higher threshold
    assert result.threshold == 0.65 and result.active_exits == [True] and result.rule == "ltt"
    assert result.p_value <= 0.1 and result.confidence == 0.9 and result.n_calibration == 60
    sweep_table = result.sweep.set_index("threshold")
    assert not sweep_table.loc[0.55, "passes"]  # 3 losses cancel the gains below 0.6
    assert sweep_table.loc[[0.6, 0.65, 0.8, 0.95], "passes"].all()
    # plain accepts 0.0, where the 3 losses cancel the 3 gains (measured drop 0)
    assert calibrate(probs, targets, table, rule="plain").threshold == 0.0
    # with one gain at the top the first test fails, and fixed-sequence testing stops there
    probs, targets = ltt_user(top_gains=1, mid_losses=0)
    assert calibrate(probs, targets, table, rule="ltt", **ONE_PP_FULL_GRID).active_exits == [False]


def test_ltt_without_labels_needs_many_samples():
    """Without labels the drop is the share of samples whose early answer differs from the
    final one: there are no gains, so a 1 pp promise at 90% needs ~230 agreeing samples."""
    table = costs_table([1.0, 10.0], [0.1, 0.0])
    for n, certified in ((100, False), (300, True)):
        probs = one_hot_probs([[0.97] * n, [0.9] * n], [[0] * n, [0] * n])
        assert any(calibrate(probs, None, table, rule="ltt", **ONE_PP_FULL_GRID).active_exits) == certified


def test_the_default_tolerance_is_what_a_writers_decision_images_can_certify():
    """The default's 2 pp at 90% needs (1 - 0.02)^n <= 0.1, n >= 114 agreeing samples: about
    the ~105-115 out-of-fold images a LEAF writer has (1 pp would need 230)."""
    table = costs_table([1.0, 10.0], [0.1, 0.0])
    for n, certified in ((100, False), (120, True)):
        probs = one_hot_probs([[0.97] * n, [0.9] * n], [[0] * n, [0] * n])
        assert any(calibrate(probs, None, table).active_exits) == certified


# --- the guarantee, on simulated users whose drop is known ------------------------------------

EXIT_ACCURACY = ((0.10, 0.75), (0.20, 0.70))  # exit k is right with probability a + b * confidence
FINAL_ACCURACY = 0.8
SIM_COSTS = costs_table([2.0, 4.0, 10.0], [0.3, 0.3, 0.0])


def simulated_user(n, generator, num_classes=10):
    """Two early exits and the final one. Each exit's top-1 confidence is 1 - 0.7 U^2 (mass near
    1, like personalised exits), its correctness a coin of probability a + b * confidence, the
    final exit right with probability 0.8, all independent: confident exits beat the final one,
    unsure ones lose to it."""
    u = torch.rand(2, n, generator=generator, dtype=torch.float64)
    confidence = 1 - 0.7 * u**2
    p_right = torch.stack([a + b * confidence[k] for k, (a, b) in enumerate(EXIT_ACCURACY)])
    right = torch.rand(2, n, generator=generator, dtype=torch.float64) < p_right
    final_right = torch.rand(1, n, generator=generator, dtype=torch.float64) < FINAL_ACCURACY
    confidence = torch.cat([confidence, torch.full((1, n), 0.9, dtype=torch.float64)])
    wrong_class = 1 + torch.arange(n) % (num_classes - 1)
    predictions = torch.where(torch.cat([right, final_right]), 0, wrong_class)
    return one_hot_probs(confidence, predictions, num_classes), torch.zeros(n, dtype=torch.long)


def population_drop(threshold, active):
    """The exact accuracy drop of a policy on `simulated_user`'s population. With u_t =
    sqrt((1 - t) / 0.7) = P(confidence > t): an exit taking the samples above t contributes
    E[1{c > t} (0.8 - a - b c)] = (0.8 - a - b) u_t + 0.7 b u_t^3 / 3, and exit 1 only sees
    the samples exit 0 did not take (probability 1 - u_t, independent)."""
    if threshold >= 1 or not any(active):
        return 0.0
    u = min(1.0, math.sqrt((1 - threshold) / 0.7))

    def part(k):
        a, b = EXIT_ACCURACY[k]
        return (FINAL_ACCURACY - a - b) * u + 0.7 * b * u**3 / 3

    if all(active):
        return part(0) + (1 - u) * part(1)
    return part(active.index(True))


def test_population_drop_matches_a_large_sample():
    probs, targets = simulated_user(200_000, torch.Generator().manual_seed(99))
    for threshold, active in ((0.6, [True, True]), (0.8, [False, True]), (0.7, [True, False])):
        row = sweep(probs, targets, ExitCosts.flops(SIM_COSTS), active, thresholds=[threshold]).iloc[0]
        measured = (row["losses"] - row["gains"]) / len(targets)
        assert measured == pytest.approx(population_drop(threshold, active), abs=0.003)


def test_ltt_keeps_its_promise_where_the_measured_drop_does_not():
    """Many seeded users of 60 calibration samples, exit pruning on: the share of users whose
    chosen policy truly loses more than 1 pp stays at or below delta = 10% for "ltt" (with a
    Monte-Carlo allowance of three standard errors), while "plain" breaks it most of the time.
    True drops below 1 pp need thresholds >= 0.75 here; lower ones save more FLOPs."""
    draws, delta = 150, 0.1
    generator = torch.Generator().manual_seed(2024)
    violations = {"plain": 0, "ltt": 0}
    early_exits = 0
    for _ in range(draws):
        probs, targets = simulated_user(60, generator)
        for rule in violations:
            result = calibrate(probs, targets, SIM_COSTS, rule=rule, confidence=1 - delta)
            violations[rule] += population_drop(result.threshold, result.active_exits) > 0.01
            early_exits += rule == "ltt" and any(result.active_exits)
    allowance = 3 * math.sqrt(delta * (1 - delta) / draws)
    assert violations["ltt"] / draws <= delta + allowance
    assert violations["plain"] / draws > delta + allowance
    assert early_exits / draws >= 0.1  # not kept by never letting a sample leave early


def test_run_user_calibrates_on_the_route_it_is_given():
    """Validation route: the threshold is chosen on the guard's validation split only;
    out-of-fold route: on every personalisation image; a baseline ignores the route."""
    from fedexits.engine import OutOfFoldConfig, PersonalisationConfig
    from fedexits.engine.personalise import split_validation
    from fedexits.models import cost_table
    from fedexits.study.protocol import run_user

    from .conftest import make_tiny_model, make_user

    x, y = make_user(n=40, seed=1, shift=2)
    test = make_user(n=24, seed=5, shift=2)
    train = (x, y, torch.ones(40, dtype=torch.bool))
    fast = PersonalisationConfig(epochs=2, lr=0.05, batch_size=16)
    costs = cost_table(make_tiny_model())
    ltt = CalibrationConfig(rule="ltt", confidence=0.9, route="validation")
    val = run_user(make_tiny_model(), costs, train, test, fast, ltt)
    _, val_idx = split_validation(40, fast.val_fraction, fast.seed)
    assert val.n_calibration == len(val_idx) < 40
    oof_setting = CalibrationConfig(rule="ltt", route="out_of_fold", out_of_fold=OutOfFoldConfig(folds=4))
    oof = run_user(make_tiny_model(), costs, train, test, fast, oof_setting)
    assert oof.n_calibration == 40 and oof.n_train == 40
    assert len(oof.guard_fired) == 4 and set(oof.guard_fired) <= {0, 1}  # 4 early exits
    assert oof.calibration_p_value != oof.calibration_p_value or 0 <= oof.calibration_p_value <= 0.1
    none = run_user(make_tiny_model(), costs, train, test, fast, oof_setting, method="none")
    assert none.n_calibration == 40 and none.guard_fired == [-1] * 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("calibration.rule=median", "calibration.rule must be one of plain, margin, ltt"),
        ("calibration.confidence=1.0", "calibration.confidence must be in"),
        ("calibration.route=test", "calibration.route must be one of validation, out_of_fold"),
        ("calibration.out_of_fold.folds=1", "calibration.out_of_fold.folds must be an integer >= 2"),
        ("calibration.out_of_fold.guard_test=t", "calibration.out_of_fold.guard_test must be one of"),
    ],
)
def test_calibration_settings_from_the_command_line(override, message):
    from fedexits.study.config import compose_config

    with pytest.raises(SettingsError, match=message):
        compose_config([override])
    chosen = compose_config(["calibration.rule=margin", "calibration.route=out_of_fold"]).calibration
    assert (chosen.rule, chosen.route, chosen.out_of_fold.folds) == ("margin", "out_of_fold", 5)


@pytest.mark.parametrize("rule", ["plain", "ltt"])
def test_an_exit_overhead_switches_off_exits_that_only_pay_in_flops(rule):
    """Exit 1 catches 5% of the samples: worth its head in FLOPs, not once each exit also costs
    5 MFLOPs of dispatch; the reported cost stays the true FLOPs."""
    n = 200
    conf0 = [0.9] * 180 + [0.3] * 20
    conf1 = [0.3] * 180 + [0.9] * 10 + [0.3] * 10
    probs = one_hot_probs([conf0, conf1, [0.9] * n], [[0] * n] * 3)
    targets = torch.zeros(n, dtype=torch.long)
    table = costs_table([1.0, 2.0, 10.0], [0.1, 0.1, 0.1])
    settings = dict(rule=rule, thresholds=[0.5, 1.0])
    by_flops = calibrate(probs, targets, table, **settings)
    by_runtime = calibrate(probs, targets, table, exit_overhead_mflops=5.0, **settings)
    assert by_flops.active_exits == [True, True] and by_runtime.active_exits == [True, False]
    assert by_runtime.threshold == by_flops.threshold == 0.5
    assert by_runtime.expected_mflops == pytest.approx(0.9 * 1.1 + 0.1 * 10.2)
    with pytest.raises(SettingsError, match="calibration.exit_overhead_mflops must be >= 0 MFLOPs"):
        CalibrationConfig(exit_overhead_mflops=-1)
