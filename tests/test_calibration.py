import pandas as pd
import pytest
import torch

from fedexits.engine import ExitCosts, calibrate, pareto_front, sweep
from fedexits.engine.calibration import apply_calibration


def costs_table(backbone, heads):
    return pd.DataFrame({"backbone_mflops": backbone, "head_mflops": heads})


def one_hot_probs(confidences, predictions, num_classes=10):
    """(M+1, N, C) probabilities with the given top-1 confidence and class per exit/sample."""
    conf = torch.tensor(confidences, dtype=torch.float64)
    pred = torch.tensor(predictions)
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
    result = calibrate(probs, targets, table, tolerance_pp=1.0)
    # any threshold in [0.3, 0.95) keeps 100 %; the smallest grid point above 0.3 is 0.3
    # (0.3 > 0.3 is false, so the 20 unsure samples go to the final exit) -> exactly 0.3
    assert result.threshold == 0.3 and result.accuracy == 1.0 and result.final_accuracy == 1.0
    assert result.expected_mflops == pytest.approx(0.8 * 1.1 + 0.2 * 10.1)
    assert result.speedup == pytest.approx(10.0 / result.expected_mflops)
    # zero tolerance with a final exit that is worse: the same threshold still qualifies
    assert calibrate(probs, targets, table, tolerance_pp=0.0).threshold == 0.3


def test_tolerance_trades_accuracy_for_cost():
    # exit 0 is right on 97 of 100 at confidence 0.6, final is always right
    probs = one_hot_probs([[0.6] * 100, [0.9] * 100], [[1] * 97 + [0] * 3, [1] * 100])
    targets = torch.ones(100, dtype=torch.long)
    table = costs_table([1.0, 10.0], [0.1, 0.0])
    strict = calibrate(probs, targets, table, tolerance_pp=1.0)
    loose = calibrate(probs, targets, table, tolerance_pp=5.0)
    assert strict.active_exits == [False] and strict.accuracy == 1.0  # exit 0 only costs
    assert loose.threshold == 0.0 and loose.accuracy == 0.97 and loose.speedup == pytest.approx(10 / 1.1)


def test_exits_that_never_help_are_pruned():
    # exit 0 is never confident; exit 1 is confident and right
    probs = one_hot_probs([[0.2] * 10, [0.9] * 10, [0.9] * 10], [[0] * 10, [1] * 10, [1] * 10])
    targets = torch.ones(10, dtype=torch.long)
    table = costs_table([1.0, 2.0, 10.0], [0.5, 0.5, 0.0])
    result = calibrate(probs, targets, table)
    assert result.active_exits == [False, True]
    assert result.thresholds() == [None, result.threshold]
    assert result.expected_mflops == pytest.approx(2.5)  # exit 0's head no longer runs
    assert calibrate(probs, targets, table, prune=False).expected_mflops == pytest.approx(3.0)


def test_without_labels_accuracy_is_agreement_with_the_final_exit():
    probs = one_hot_probs([[0.9] * 4, [0.9] * 4], [[0, 1, 2, 0], [0, 1, 2, 2]])
    result = calibrate(probs, None, costs_table([1.0, 10.0], [0.1, 0.0]), tolerance_pp=30.0)
    assert result.final_accuracy == 1.0 and result.accuracy == 0.75 and result.threshold == 0.0


def test_pareto_front_drops_dominated_points():
    table = pd.DataFrame({"expected_mflops": [1, 2, 3, 4], "accuracy": [0.5, 0.4, 0.8, 0.8]})
    assert pareto_front(table)["expected_mflops"].tolist() == [1, 3]


def test_apply_calibration_on_another_set():
    probs = one_hot_probs([[0.9, 0.1], [0.9, 0.9]], [[0, 0], [0, 1]])
    result = calibrate(probs, torch.tensor([0, 1]), costs_table([1.0, 10.0], [0.1, 0.0]))
    row = apply_calibration(probs, torch.tensor([0, 0]), result, costs_table([1.0, 10.0], [0.1, 0.0]))
    assert row["accuracy"] == 0.5


def test_bad_calibration_arguments():
    probs = one_hot_probs([[0.9], [0.9]], [[0], [0]])
    table = costs_table([1.0, 10.0], [0.1, 0.0])
    with pytest.raises(ValueError, match="drop tolerance must be >= 0"):
        calibrate(probs, None, table, tolerance_pp=-1)
    with pytest.raises(ValueError, match=r"thresholds must be in \[0, 1\]"):
        calibrate(probs, None, table, thresholds=[0.5, 1.2])


def test_margin_rejects_thresholds_that_win_on_luck():
    # 20 calibration samples; at threshold 0 exit 0 loses 2 and gains 2 against the final exit:
    # zero measured drop, but with a standard error of sqrt(4)/20 = 10 pp
    conf0 = [0.9] * 20
    pred0 = [0, 0] + [1, 1] + [1] * 16  # wrong on 0-1, right on 2-3 (final is wrong there)
    final = [1, 1] + [0, 0] + [1] * 16
    probs = one_hot_probs([conf0, [0.9] * 20], [pred0, final])
    targets = torch.ones(20, dtype=torch.long)
    table = costs_table([1.0, 10.0], [0.1, 0.0])
    lucky = calibrate(probs, targets, table, tolerance_pp=1.0, margin_z=0.0)
    assert lucky.threshold == 0.0 and lucky.accuracy == lucky.final_accuracy
    careful = calibrate(probs, targets, table, tolerance_pp=1.0, margin_z=1.0)
    assert careful.active_exits == [False]  # the exit cannot be trusted: it is switched off
    with pytest.raises(ValueError, match="calibration margin must be >= 0"):
        calibrate(probs, targets, table, margin_z=-1)
