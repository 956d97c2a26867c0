"""The report states the calibration's promise and how many users broke it on their test images."""

import pandas as pd

from fedexits.report.promise import promise_lines, promise_summary


def thresholds(drops_pp, init="global"):
    final = 0.9
    return pd.DataFrame(
        {
            "user": [f"u{i}" for i in range(len(drops_pp))],
            "init": init,
            "final_accuracy": final,
            "accuracy": [final - d / 100 for d in drops_pp],
        }
    )


def test_share_of_users_over_the_tolerance():
    frame = pd.concat([thresholds([0.0, 1.0, 1.5, 3.0, -2.0]), thresholds([5.0], init="scratch")])
    promise = promise_summary(frame, {"rule": "ltt", "confidence": 0.9, "drop_tolerance_pp": 1.0})
    row = promise["inits"]["global"]
    assert row["users"] == 5
    assert row["share_over_tolerance"] == 2 / 5  # a drop of exactly 1 pp keeps the promise
    assert row["share_over_2pp"] == 1 / 5
    assert abs(row["mean_drop_pp"] - 0.7) < 1e-9
    assert promise["inits"]["scratch"]["share_over_tolerance"] == 1.0
    text = "\n".join(promise_lines(promise))
    assert "confidence 90%" in text and "40% of 5 users exceed 1 pp" in text


def test_heuristic_rules_state_no_confidence():
    promise = promise_summary(
        thresholds([0.5]), {"rule": "margin", "confidence": 0.9, "drop_tolerance_pp": 2.0}
    )
    assert promise["confidence"] is None
    text = "\n".join(promise_lines(promise))
    assert "no stated confidence" in text and "0% of 1 users exceed 2 pp" in text
    assert promise_lines(promise_summary(None, None)) == []
