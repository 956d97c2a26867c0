"""ClientApp: every virtual client is one user (its partition id picks the user).

- query: tell the server which partition (user) this node is.
- train: one round of federated exit training on this user's data (global population).
- evaluate.exits (`EVALUATE_EXITS`): federated evaluation of the exits on a global user kept out of
  training.
- evaluate: the protocol of the message's method (exits, a baseline, a pruning method) for a
  held-out user: evaluate, personalise, calibrate, report.
- train.live_day (`LIVE_DAY`): lifecycle mode, one day of one user under every policy
  (`fl/lifecycle_client.py`). One app serves both modes, so `flwr run .` runs either.

A user whose data cannot work (UserDataError) gets a USER_ERROR reply with one line; any other
exception is a bug: Flower logs its traceback and the server fails the run.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..errors import UserDataError, one_line
from ..study.worker import Worker, get_worker

# Error code for a user's unusable data (Flower's own codes are small ints).
USER_ERROR = 1000
# Federated evaluation of the exits (a named action, apart from the personalisation evaluate).
EVALUATE_EXITS = "evaluate.exits"
# Lifecycle mode's day (one server round = one day).
LIVE_DAY = "train.live_day"

app = ClientApp()


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _worker(config: ConfigRecord) -> Worker:
    """This process's worker; torch uses as many threads as the client was given CPUs (Ray
    actors otherwise oversubscribe the machine: N actors x all cores)."""
    worker = get_worker(str(config["plan"]))
    torch.set_num_threads(max(1, int(worker.plan.settings.simulation.client_cpus)))
    return worker


def _user_error(msg: Message, user: str, exc: UserDataError) -> Message:
    return Message(Error(code=USER_ERROR, reason=f"user {user}: {one_line(exc)}"), reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"node": MetricRecord({"partition-id": _partition(context)})}), reply_to=msg)


@app.train()
def train_exits(msg: Message, context: Context) -> Message:
    """Local exit training: the backbone stays frozen; only exits travel. FedProx's strategy puts
    its proximal mu into the config."""
    config = msg.content["config"]
    worker = _worker(config)
    user = worker.users[_partition(context)]
    try:
        update = worker.train_user(
            user,
            msg.content["arrays"].to_torch_state_dict(),
            int(config["server-round"]),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
        )
    except UserDataError as exc:
        return _user_error(msg, user, exc)
    metrics = MetricRecord(
        {
            "num-examples": update.num_examples,
            "train-loss": update.loss,
            "features-cached": int(update.features_cached),
        }
    )
    return Message(RecordDict({"arrays": ArrayRecord(update.exits), "metrics": metrics}), reply_to=msg)


@app.evaluate(EVALUATE_EXITS.split(".")[1])
def evaluate_exits(msg: Message, context: Context) -> Message:
    """Every exit's accuracy on this (evaluation) client's images."""
    worker = _worker(msg.content["config"])
    user = worker.users[_partition(context)]
    try:
        n, accuracies = worker.evaluate_exits(user, msg.content["arrays"].to_torch_state_dict())
    except UserDataError as exc:
        return _user_error(msg, user, exc)
    metrics = {"num-examples": n, **{f"accuracy-{k}": a for k, a in enumerate(accuracies)}}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def personalise_user(msg: Message, context: Context) -> Message:
    """Evaluate every exit, personalise with the message's method, calibrate, reply with the record."""
    config = msg.content["config"]
    worker = _worker(config)
    user = worker.users[_partition(context)]
    try:
        record = worker.personalise_user(
            user, msg.content["arrays"].to_torch_state_dict(), str(config["init"]), str(config["method"])
        )
    except UserDataError as exc:
        return _user_error(msg, user, exc)
    return Message(RecordDict({"result": ConfigRecord({"record": record.to_json()})}), reply_to=msg)


@app.train(LIVE_DAY.split(".")[1])
def live_day(msg: Message, context: Context) -> Message:
    from .lifecycle_client import live_day as live  # it imports this module's helpers

    return live(msg, context)
