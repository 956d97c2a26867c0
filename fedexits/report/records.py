"""What one user's run produces: the typed record the study's worker fills and the report reads.

Plain Python values only (numbers, strings, lists), so a record crosses Flower's messages as JSON
and the report never needs torch or Flower.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

# Why a user has no result. `user`: its data or settings cannot work (expected; one line);
# `bug`: an unexpected exception (the traceback is logged and the run fails); `timeout`: no
# reply within the run's deadline; `backend`: the simulation backend lost the client.
FAILURE_KINDS = ("user", "bug", "timeout", "backend")


@dataclass
class UserResult:
    """The per-user protocol's numbers: per-exit accuracy before/after personalisation (the last
    entry is the final classifier), the chosen threshold and what it buys on the test split, and
    the test split's accuracy/cost curve over thresholds."""

    accuracy_before: list[float]
    accuracy_after: list[float]
    guard_fired: list[
        int
    ]  # per early exit: 1 kept the incoming exit, 0 kept the personalised one, -1 no guard
    personalise_s: float
    n_train: int
    n_test: int
    n_labelled: int
    threshold: float
    active_exits: list[int]
    accuracy_at_threshold: float
    final_accuracy: float
    expected_mflops: float
    speedup: float
    sweep_threshold: list[float]
    sweep_accuracy: list[float]
    sweep_mflops: list[float]
    peak_memory_mb: float = float("nan")
    latency_ms: list[float] = field(default_factory=list)  # per exit, the network truncated there
    expected_latency_ms: float = float("nan")
    latency_speedup: float = float("nan")
    sweep_latency_ms: list[float] = field(default_factory=list)
    n_calibration: int = 0  # samples the threshold was chosen on
    calibration_p_value: float = float("nan")  # rule "ltt": p-value of "drop > tolerance" there
    # Pruning methods replace the network: its measured cost (the final exit's row of the
    # personalised stage), and one point per pruning level of the user's accuracy/cost curve
    # (level, flops_removed, channel_ratio, accuracy, mflops, params, latency_ms, personalise_s).
    network_mflops: float = float("nan")
    network_params: float = float("nan")
    network_latency_ms: float = float("nan")
    prune_sweep: list[dict] = field(default_factory=list)


@dataclass
class Failure:
    kind: str  # one of FAILURE_KINDS
    message: str  # one line

    def __post_init__(self):
        if self.kind not in FAILURE_KINDS:
            raise ValueError(f"failure kind must be one of {FAILURE_KINDS}, got {self.kind!r}")


@dataclass
class UserRecord:
    """One user under one exit initialisation and personalisation method: a result, or the
    reason there is none."""

    user: str
    init: str
    result: UserResult | None = None
    failure: Failure | None = None
    notes: list[str] = field(default_factory=list)  # e.g. "only 120 images: held out 50% for test"
    method: str = "exits"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> UserRecord:
        data = json.loads(text)
        result = UserResult(**data["result"]) if data.get("result") else None
        failure = Failure(**data["failure"]) if data.get("failure") else None
        notes = list(data.get("notes") or [])
        return cls(data["user"], data["init"], result, failure, notes, data.get("method", "exits"))
