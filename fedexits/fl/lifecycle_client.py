"""Lifecycle mode on the client (the ClientApp's `train.live_day`): every virtual client is one
user; one server round is one day.

The user's state under every policy (`engine.user_state.UserState`: personalised exits,
threshold, buffer, exploration statistic) lives between rounds in Flower's per-node
`Context.state`, one ArrayRecord and one ConfigRecord per policy, not in module globals or the
Ray actor: it survives actor reuse and behaves the same under `flwr run`. The frozen model and
the population are per-process caches (`study.lifecycle.get_lifecycle_worker`), like the
protocol's worker.
"""

from __future__ import annotations

import json

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from ..engine.user_state import UserState
from ..errors import UserDataError
from ..study.lifecycle import get_lifecycle_worker
from .client_app import _partition, _user_error

STATE_PREFIX = "lifecycle"
FAILED_KEY = f"{STATE_PREFIX}.failed"  # ConfigRecord {"policies": "a,b"}: policies that failed


def load_states(state: RecordDict, policies) -> tuple[dict[str, UserState], set[str]]:
    """The user's states per policy (absent before its first day) and its failed policies."""
    states = {}
    for policy in policies:
        key = f"{STATE_PREFIX}.{policy}"
        if f"{key}.scalars" in state:
            arrays = {name: array.numpy() for name, array in state[f"{key}.arrays"].items()}
            states[policy] = UserState.from_arrays(arrays, dict(state[f"{key}.scalars"]))
    failed = str(state[FAILED_KEY]["policies"]) if FAILED_KEY in state else ""
    return states, {p for p in failed.split(",") if p}


def save_states(state: RecordDict, states: dict[str, UserState], failed: set[str]) -> None:
    for policy, user_state in states.items():
        arrays, scalars = user_state.to_arrays()
        key = f"{STATE_PREFIX}.{policy}"
        state[f"{key}.arrays"] = ArrayRecord({name: Array(a) for name, a in arrays.items()})
        state[f"{key}.scalars"] = ConfigRecord(scalars)
    state[FAILED_KEY] = ConfigRecord({"policies": ",".join(sorted(failed))})


def live_day(msg: Message, context: Context) -> Message:
    """Live the round's day under every policy; reply with the day's rows (and, when
    orchestrator+fedavg personalised tonight, its exits for the server's FedAvg)."""
    config = msg.content["config"]
    worker = get_lifecycle_worker(str(config["plan"]))
    torch.set_num_threads(max(1, int(worker.plan.settings.simulation.client_cpus)))
    user = worker.users[_partition(context)]
    day = int(config["day"])
    start = msg.content["arrays"].to_torch_state_dict() if "arrays" in msg.content else None
    states, failed = load_states(context.state, worker.lifecycle.config.policies)
    try:
        result = worker.live_day(user, day, states, failed, start)
    except UserDataError as exc:
        return _user_error(msg, user, exc)
    save_states(context.state, states, failed)
    content = RecordDict(
        {"day": ConfigRecord({"rows": json.dumps(result.rows), "failures": json.dumps(result.failures)})}
    )
    if result.exits is not None:
        content["exits"] = ArrayRecord({name: t.cpu() for name, t in result.exits.items()})
        content["metrics"] = MetricRecord({"num-examples": result.num_samples})
    return Message(content, reply_to=msg)
