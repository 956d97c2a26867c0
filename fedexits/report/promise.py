"""Did each user's threshold keep the calibration's promise on its test images?

The calibration promises (rule "ltt": at a stated confidence per user) that the accuracy drop at
the chosen threshold against the final exit stays within `drop_tolerance_pp`. The test split was
never used for a decision, so the share of users whose realised test drop exceeds the tolerance
is the honest check (it includes the test split's own sampling noise: a few images per user).
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd


def promise_summary(thresholds: pd.DataFrame | None, calibration: Mapping | None) -> dict:
    """Per init: users, the mean realised drop (pp) and the share of users whose drop exceeds the
    tolerance (and 2 pp); plus the rule, route and confidence the run used."""
    calibration = dict(calibration or {})
    tolerance = float(calibration.get("drop_tolerance_pp", float("nan")))
    rule = calibration.get("rule")
    out = {
        "rule": rule,
        "route": calibration.get("route"),
        "drop_tolerance_pp": tolerance,
        "confidence": calibration.get("confidence") if rule == "ltt" else None,
        "inits": {},
    }
    if thresholds is None or thresholds.empty:
        return out
    drop_pp = (thresholds["final_accuracy"] - thresholds["accuracy"]) * 100.0
    frame = thresholds.assign(init=thresholds["init"].astype(str), drop_pp=drop_pp)
    for init, rows in frame.groupby("init"):
        out["inits"][init] = {
            "users": int(len(rows)),
            "mean_drop_pp": float(rows["drop_pp"].mean()),
            # a small slack: a drop of exactly the tolerance keeps the promise despite float noise
            "share_over_tolerance": float((rows["drop_pp"] > tolerance + 1e-9).mean()),
            "share_over_2pp": float((rows["drop_pp"] > 2.0 + 1e-9).mean()),
        }
    return out


def promise_lines(promise: Mapping | None) -> list[str]:
    """The report's sentences on the calibration rule and whether it kept its promise."""
    if not promise or not promise.get("rule"):
        return []
    tolerance = promise.get("drop_tolerance_pp")
    rule, confidence = promise["rule"], promise.get("confidence")
    if rule == "ltt":
        stated = (
            f"Calibration rule `ltt` (Learn-then-Test, exact paired test): for each user, with "
            f"confidence {confidence:.0%}, the accuracy drop at the threshold stays within "
            f"{tolerance:g} pp of the final exit."
        )
    else:
        stated = (
            f"Calibration rule `{rule}`: the drop measured on the calibration images stays within "
            f"{tolerance:g} pp (a heuristic with no stated confidence)."
        )
    lines = [stated + f" Calibration images: route `{promise.get('route')}`."]
    for init, row in (promise.get("inits") or {}).items():
        also = f" ({row['share_over_2pp']:.0%} exceed 2 pp)" if tolerance != 2 else ""
        lines.append(
            f"- init `{init}`: realised test drop {row['mean_drop_pp']:.2f} pp on average; "
            f"{row['share_over_tolerance']:.0%} of {row['users']} users exceed {tolerance:g} pp{also}."
        )
    return lines
