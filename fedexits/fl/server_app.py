"""ServerApp: waits for every virtual client, maps nodes to users, initialises the exits (global,
federated or scratch), sends each sampled held-out user its exits and the method to run (the
run's method under every init, then each baseline under the first), and collects the records.

`make_server_app(prepared, sink, stopped)` is what `fedexits.simulate` runs (the plan is passed in:
`context.run_config` is empty under the simulation engine); the module-level `app` is the entry
point for `flwr run .`, which composes the same settings from the run config and prepares them.
Users whose replies are missing at the deadline are recorded as failures; the rest are kept.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import one_line
from ..report.records import Failure, UserRecord
from ..study.plan import federated_clients, sample_users
from ..study.prepare import Prepared, initial_exits
from ..study.results import RunOutcome
from .client_app import USER_ERROR
from .strategy import make_strategy


class BackendStopped(RuntimeError):
    """The simulation backend ended while the server was still waiting for clients."""


def progress_bar() -> Progress:
    """The server's progress display: what, a bar, done of total, time elapsed."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float, stopped: threading.Event) -> list[int]:
    """The server may start before every virtual client registered: wait for all of them."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if stopped.is_set():
            raise BackendStopped("the simulation backend stopped before every client registered")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} of {expected} virtual clients registered in {timeout_s:.0f} s"
            )
        time.sleep(0.1)


def send_and_collect(
    grid: Grid,
    messages: list[Message],
    description: str,
    stopped: threading.Event,
    max_in_flight: int = 32,
    timeout_s: float = 3600,
) -> tuple[list[Message], list[Message], list[Message]]:
    """Push messages a few at a time (bounded memory) and pull replies, showing progress.
    Returns (replies, messages sent but not answered by the deadline, messages never sent)."""
    replies: list[Message] = []
    pending: dict[str, Message] = {}
    queue = list(messages)
    deadline = time.monotonic() + timeout_s
    with progress_bar() as progress:
        task = progress.add_task(description, total=len(queue))
        while queue or pending:
            room = max_in_flight - len(pending)
            if queue and room > 0:
                batch, queue = queue[:room], queue[room:]
                pending.update(zip(grid.push_messages(batch), batch))
            got = list(grid.pull_messages(list(pending)))
            for reply in got:
                pending.pop(reply.metadata.reply_to_message_id, None)
            replies.extend(got)
            progress.update(task, advance=len(got))
            if stopped.is_set():
                raise BackendStopped(
                    f"{description}: the simulation backend stopped with {len(pending)} replies missing"
                )
            if time.monotonic() > deadline:
                return replies, list(pending.values()), queue
            if not got:
                time.sleep(0.02)
    return replies, [], []


def discover_partitions(
    grid: Grid, nodes: list[int], stopped: threading.Event, timeout_s: float
) -> dict[int, int]:
    """partition id -> node id, asked of every node once (node ids are random in simulation)."""
    messages = [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    replies, missing, _ = send_and_collect(
        grid, messages, "registering clients", stopped, max_in_flight=len(messages), timeout_s=timeout_s
    )
    failed = [r.error.reason for r in replies if r.has_error()]
    if failed or missing:
        detail = one_line(failed[0]) if failed else f"no reply within {timeout_s:.0f} s"
        raise RuntimeError(f"{len(failed) + len(missing)} clients did not identify themselves: {detail}")
    return {int(r.content["node"]["partition-id"]): r.metadata.src_node_id for r in replies}


def connect_clients(grid: Grid, prepared: Prepared, stopped: threading.Event) -> dict[int, int]:
    """Wait until every virtual client registered; partition id -> node id."""
    sim = prepared.plan.settings.simulation
    nodes = wait_for_nodes(grid, len(prepared.users), sim.registration_timeout_s, stopped)
    return discover_partitions(grid, nodes, stopped, sim.registration_timeout_s)


def reply_reason(reason: str) -> str:
    """Flower wraps a ClientApp's exception in a Ray traceback; keep the exception's message."""
    marker = "Message:"
    if marker in reason:
        reason = reason.rsplit(marker, 1)[1]
    return one_line(reason.strip().strip("'>")) if reason.strip() else "unknown error"


def to_record(init: str, method: str, user: str, reply: Message) -> UserRecord:
    if not reply.has_error():
        return UserRecord.from_json(str(reply.content["result"]["record"]))
    code, reason = reply.error.code, reply.error.reason
    if code == USER_ERROR:
        return UserRecord(user, init, failure=Failure("user", reason), method=method)
    kind = "bug" if code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION else "backend"
    failure = Failure(kind, f"user {user}: {reply_reason(reason)}")
    return UserRecord(user, init, failure=failure, method=method)


def federated_exits(grid: Grid, prepared: Prepared, node_of: dict[int, int], evaluate_fn=None):
    """Federated exit training (backbone frozen) from a random init with Flower's strategy across
    the training clients of the global population, evaluated every few rounds on the evaluation
    clients (global users that never train; never held-out users). Returns the exit weights and
    the record of every round (read by `fedexits.study.budget`). `evaluate_fn(round, arrays)`
    is Flower's server-side evaluation (experiments; its metrics go to `server_evaluations`)."""
    plan = prepared.plan
    settings = plan.settings
    fed, sim = settings.federated, settings.simulation
    num_global = len(prepared.users) - prepared.num_held_out
    train_parts, eval_parts = federated_clients(
        prepared.num_held_out, num_global, fed.eval_clients(num_global), settings.seed
    )
    eval_rounds = [r for r in range(1, fed.rounds + 1) if r % fed.eval_every == 0 or r == fed.rounds]
    strategy = make_strategy(
        fed.strategy,
        client_lr=fed.lr,
        train_nodes=[node_of[p] for p in train_parts],
        clients_per_round=fed.clients_per_round,
        seed=settings.seed,
        eval_nodes=[node_of[p] for p in eval_parts],
        eval_rounds=eval_rounds,
        buffer_keys=prepared.exit_buffers,
    )
    plan_json = plan.to_json()
    partition_of = {node: p for p, node in node_of.items()}
    initial = ArrayRecord(initial_exits(plan, "federated"))

    def evaluate(arrays: ArrayRecord):
        """One evaluation outside the rounds (Flower's loop evaluates after rounds 1..R)."""
        messages = strategy.evaluation_messages(0, arrays, ConfigRecord({"plan": plan_json}), grid)
        if not messages:
            return None
        return strategy.aggregate_evaluate(0, grid.send_and_receive(messages, timeout=sim.timeout_s))

    reference = evaluate(ArrayRecord(initial_exits(plan, "global")))  # central exits, same clients
    evaluations = {0: evaluate(initial)}
    with progress_bar() as progress:
        task = progress.add_task(f"federated exit training ({fed.strategy.name}, rounds)", total=fed.rounds)
        strategy.on_round = lambda server_round: progress.update(task, completed=server_round)
        result = strategy.start(
            grid,
            initial_arrays=initial,
            num_rounds=fed.rounds,
            train_config=ConfigRecord({"plan": plan_json}),
            evaluate_config=ConfigRecord({"plan": plan_json}),
            timeout=sim.timeout_s,
            evaluate_fn=evaluate_fn,
        )
    if not result.train_metrics_clientapp:
        first = reply_reason(strategy.errors[0][1]) if strategy.errors else "no replies"
        raise RuntimeError(f"federated exit training: no round succeeded ({first})")
    evaluations.update(result.evaluate_metrics_clientapp)
    history = {
        "strategy": fed.strategy.name,
        "clients_per_round": fed.clients_per_round,
        "local_epochs": fed.local_epochs,
        "train_clients": len(train_parts),
        "eval_users": [prepared.users[p] for p in eval_parts],
        "rounds": [
            {
                "round": r,
                "clients": len(strategy.sampled[r]),
                "users": [prepared.users[partition_of[node]] for node in strategy.sampled[r]],
                "clients_ok": strategy.replied.get(r, 0),
                "images": strategy.samples.get(r, 0),
                "features_cached": strategy.cached.get(r, 0),
                "train_loss": _metric(result.train_metrics_clientapp.get(r), "train-loss"),
            }
            for r in sorted(strategy.sampled)
        ],
        "evaluations": {r: _accuracies(m) for r, m in sorted(evaluations.items()) if m is not None},
        "reference": None if reference is None else _accuracies(reference),
        "server_evaluations": {r: dict(m) for r, m in sorted(result.evaluate_metrics_serverapp.items())},
        "failures": [{"round": r, "stage": "train", "error": reply_reason(e)} for r, e in strategy.errors]
        + [{"round": r, "stage": "evaluate", "error": reply_reason(e)} for r, e in strategy.eval_errors],
    }
    return result.arrays.to_torch_state_dict(), history


def _metric(record, key: str) -> float | None:
    return None if record is None or key not in record else float(record[key])


def _accuracies(record) -> dict:
    """{"clients": n, "accuracy": [per exit, the final exit last]} from an evaluation record."""
    exits = sorted(int(k.split("-")[1]) for k in record if k.startswith("accuracy-"))
    return {"clients": int(record["clients"]), "accuracy": [float(record[f"accuracy-{k}"]) for k in exits]}


def run_study(grid: Grid, prepared: Prepared, stopped: threading.Event | None = None) -> RunOutcome:
    """Every (init, method) of the plan on the same sampled held-out users (`prepared.users[p]`
    is partition p's user): the method under every init, the baselines under the first."""
    stopped = stopped or threading.Event()
    plan, users = prepared.plan, prepared.users
    sim = plan.settings.simulation
    node_of = connect_clients(grid, prepared, stopped)
    partition_of = {node: p for p, node in node_of.items()}
    chosen = sample_users(prepared.num_held_out, sim.num_users, plan.settings.seed)
    plan_json = plan.to_json()
    outcome = RunOutcome(records=[])
    started = time.perf_counter()
    exits_of: dict[str, dict] = {}
    for init, method in plan.jobs():
        if init not in exits_of:
            if init == "federated":
                exits_of[init], outcome.federated = federated_exits(grid, prepared, node_of)
            else:
                exits_of[init] = initial_exits(plan, init)
        arrays = ArrayRecord(exits_of[init])
        config = ConfigRecord({"init": init, "method": method, "plan": plan_json})
        messages = [
            Message(
                RecordDict({"arrays": arrays, "config": config}),
                dst_node_id=node_of[p],
                message_type=MessageType.EVALUATE,
            )
            for p in chosen
        ]
        replies, missing, unsent = send_and_collect(
            grid, messages, f"personalising ({init}, {method})", stopped, sim.max_in_flight, sim.timeout_s
        )
        outcome.records += [
            to_record(init, method, users[partition_of[r.metadata.src_node_id]], r) for r in replies
        ]
        for messages_left, reason in (
            (missing, f"no reply within simulation.timeout_s={sim.timeout_s:g} s"),
            (unsent, f"not run: simulation.timeout_s={sim.timeout_s:g} s passed before its turn"),
        ):
            outcome.records += [
                UserRecord(
                    users[partition_of[m.metadata.dst_node_id]],
                    init,
                    failure=Failure("timeout", reason),
                    method=method,
                )
                for m in messages_left
            ]
    outcome.timings["simulation_s"] = time.perf_counter() - started
    jobs = plan.jobs()
    outcome.records.sort(key=lambda r: (jobs.index((r.init, r.method)), r.user))
    return outcome


def make_server_app(
    prepared: Prepared, sink: Callable[[RunOutcome], None], stopped: threading.Event | None = None
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        sink(run_study(grid, prepared, stopped))

    return app


app = ServerApp()


@app.main()
def deployment_main(grid: Grid, context: Context) -> None:
    """`flwr run .`: compose the settings from the run config's `overrides`, prepare data and the
    global model, run the study (or, with `+experiment=lifecycle`, the days) and write the report
    into `output-dir`."""
    from ..study.config import compose_config
    from ..study.lifecycle import write_lifecycle_results
    from ..study.prepare import prepare
    from ..study.results import write_results
    from .lifecycle_server import run_lifecycle_days

    out_dir = str(context.run_config.get("output-dir", "outputs/flwr"))
    prepared = prepare(compose_config(str(context.run_config.get("overrides", "")).split()), run_dir=out_dir)
    if prepared.plan.settings.mode == "lifecycle":
        write_lifecycle_results(out_dir, prepared, run_lifecycle_days(grid, prepared))
    else:
        write_results(out_dir, prepared, run_study(grid, prepared))
