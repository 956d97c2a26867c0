"""ServerApp of lifecycle mode: one server round is one day. Each day every living user's client
gets the day number (and, once some user personalised under orchestrator+fedavg, the server's
average exits); the replies' rows are collected, and the exits of the users who personalised
that night under orchestrator+fedavg are averaged by Flower's own FedAvg aggregation
(weighted by their training samples) for the next day.

A user whose client reports a USER_ERROR (its stream cannot be built) or does not reply by the
deadline is recorded with the day and the reason, and is not asked again (its state would be
out of step); the run goes on with the others.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from ..study.lifecycle import LifecycleOutcome, lifecycle_users
from ..study.prepare import Prepared
from .client_app import LIVE_DAY
from .server_app import discover_partitions, send_and_collect, to_record, wait_for_nodes


def run_lifecycle_days(
    grid: Grid, prepared: Prepared, stopped: threading.Event | None = None
) -> LifecycleOutcome:
    stopped = stopped or threading.Event()
    plan, users = prepared.plan, prepared.users
    sim, config = plan.settings.simulation, plan.settings.lifecycle
    nodes = wait_for_nodes(grid, len(users), sim.registration_timeout_s, stopped)
    node_of = discover_partitions(grid, nodes, stopped, sim.registration_timeout_s)
    partition_of = {node: p for p, node in node_of.items()}
    living = lifecycle_users(prepared)
    outcome = LifecycleOutcome(users=[users[p] for p in living])
    fedavg = FedAvg(fraction_evaluate=0.0, min_available_nodes=1)  # only its aggregation is used
    plan_json, average = plan.to_json(), None
    started = time.perf_counter()
    for day in range(config.stream.days):
        content = {"config": ConfigRecord({"plan": plan_json, "day": day})}
        if average is not None:
            content["arrays"] = average
        messages = [
            Message(RecordDict(content), dst_node_id=node_of[p], message_type=LIVE_DAY) for p in living
        ]
        replies, missing, unsent = send_and_collect(
            grid, messages, f"day {day + 1}/{config.stream.days}", stopped, sim.max_in_flight, sim.timeout_s
        )
        replies.sort(key=lambda r: partition_of[r.metadata.src_node_id])  # a reproducible FedAvg sum
        lost, personalised = set(), []
        for reply in replies:
            p = partition_of[reply.metadata.src_node_id]
            if reply.has_error():
                failure = to_record("lifecycle", users[p], reply).failure
                outcome.failures.append(dict(user=users[p], day=day, policy="", error=failure.reason))
                lost.add(p)
                continue
            outcome.rows += json.loads(str(reply.content["day"]["rows"]))
            outcome.failures += json.loads(str(reply.content["day"]["failures"]))
            if "exits" in reply.content:
                personalised.append(reply)
        for message in missing + unsent:
            p = partition_of[message.metadata.dst_node_id]
            reason = f"no reply within simulation.timeout_s={sim.timeout_s:g} s"
            outcome.failures.append(dict(user=users[p], day=day, policy="", error=reason))
            lost.add(p)
        living = [p for p in living if p not in lost]
        if personalised:
            average, _ = fedavg.aggregate_train(day + 1, personalised)
            outcome.fedavg_nights += 1
        if not living:
            break
    outcome.timings["simulation_s"] = time.perf_counter() - started
    return outcome


def make_lifecycle_server_app(
    prepared: Prepared, sink: Callable[[LifecycleOutcome], None], stopped: threading.Event | None = None
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        sink(run_lifecycle_days(grid, prepared, stopped))

    return app
