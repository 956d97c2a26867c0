"""ClientApp: every virtual client is one user (its partition id picks the user).

- query: tell the server which partition (user) this node is.
- train: one round of federated exit training on this user's data (global population).
- evaluate: the paper's protocol for a held-out user — evaluate, personalise, calibrate, report.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..data import DataError
from .worker import Worker, get_worker

# Error code for failures of the user's data or settings (Flower's own codes are small ints).
USER_ERROR = 1000
EXPECTED_ERRORS = (DataError, ValueError, FileNotFoundError)

app = ClientApp()


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _worker(config) -> Worker:
    """This process's worker; torch uses as many threads as the client was given CPUs (Ray
    actors otherwise oversubscribe the machine: N actors x all cores)."""
    worker = get_worker(str(config["run-config"]))
    torch.set_num_threads(max(1, int(worker.config["simulation"]["client_cpus"])))
    return worker


def _user_error(msg: Message, user: str, exc: Exception) -> Message:
    reason = f"user {user}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return Message(Error(code=USER_ERROR, reason=reason), reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"node": MetricRecord({"partition-id": _partition(context)})}), reply_to=msg)


@app.train()
def train_exits(msg: Message, context: Context) -> Message:
    """Local exit training for FedAvg: the backbone stays frozen; only exits travel."""
    config = msg.content["config"]
    worker = _worker(config)
    user = worker.users[_partition(context)]
    try:
        state, n, loss = worker.train_user(
            user, msg.content["arrays"].to_torch_state_dict(), int(config["server-round"])
        )
    except EXPECTED_ERRORS as exc:
        return _user_error(msg, user, exc)
    metrics = MetricRecord({"num-examples": n, "train-loss": loss})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def personalise_user(msg: Message, context: Context) -> Message:
    """Evaluate every exit, personalise them, calibrate the threshold, reply with the numbers."""
    config = msg.content["config"]
    worker = _worker(config)
    user = worker.users[_partition(context)]
    try:
        record = worker.personalise_user(user, msg.content["arrays"].to_torch_state_dict())
    except EXPECTED_ERRORS as exc:
        return _user_error(msg, user, exc)
    info = ConfigRecord({"user": user, "notes": json.dumps(record["notes"])})
    return Message(RecordDict({"result": MetricRecord(record["result"]), "info": info}), reply_to=msg)
