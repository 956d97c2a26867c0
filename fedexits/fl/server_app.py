"""ServerApp: waits for every virtual client, maps nodes to users, initialises the exits (global,
federated or scratch), sends each sampled held-out user its exits and collects the results.

`make_server_app(config, users, num_held_out, sink)` is what `fedexits.simulate` runs (the config
is passed in, because `context.run_config` is empty under `run_simulation`); the module-level
`app` is the entry point for `flwr run .`, which composes the same Hydra config from the run
config.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..engine import load_model
from ..models import MultiExitSpec, build_multi_exit
from .strategy import SeededFedAvg


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float) -> list[int]:
    """The server may start before every virtual client registered: wait for all of them."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} of {expected} virtual clients registered in {timeout_s:.0f} s"
            )
        time.sleep(0.1)


def send_with_progress(
    grid: Grid, messages: list[Message], description: str, max_in_flight: int = 32, timeout_s: float = 3600
) -> list[Message]:
    """Push messages a few at a time (bounded memory) and pull replies, showing progress."""
    replies: list[Message] = []
    pending: set[str] = set()
    queue = list(messages)
    deadline = time.monotonic() + timeout_s
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns) as progress:
        task = progress.add_task(description, total=len(queue))
        while queue or pending:
            room = max_in_flight - len(pending)
            if queue and room > 0:
                batch, queue = queue[:room], queue[room:]
                pending.update(grid.push_messages(batch))
            got = list(grid.pull_messages(pending))
            for reply in got:
                pending.discard(reply.metadata.reply_to_message_id)
            replies.extend(got)
            progress.update(task, advance=len(got))
            if time.monotonic() > deadline:
                raise RuntimeError(f"{description}: {len(pending)} replies missing after {timeout_s:.0f} s")
            if not got:
                time.sleep(0.02)
    return replies


def discover_partitions(grid: Grid, nodes: list[int]) -> dict[int, int]:
    """partition id -> node id, asked of every node once (node ids are random in simulation)."""
    messages = [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    replies = send_with_progress(grid, messages, "registering clients", max_in_flight=len(messages))
    failed = [r.error.reason for r in replies if r.has_error()]
    if failed:
        raise RuntimeError(f"{len(failed)} clients did not identify themselves: {failed[0][:200]}")
    return {int(r.content["node"]["partition-id"]): r.metadata.src_node_id for r in replies}


def sample_users(num_held_out: int, num_users: int | None, seed: int) -> list[int]:
    """Which held-out partitions take part: our seeded choice, not Flower's sampler."""
    if num_users is None or num_users >= num_held_out:
        return list(range(num_held_out))
    if num_users < 1:
        raise ValueError(f"simulation.num_users must be >= 1, got {num_users}")
    return sorted(random.Random(seed).sample(range(num_held_out), num_users))


def initial_exits(config: dict, init: str) -> dict[str, torch.Tensor]:
    """Exit weights each init starts from: central training (global) or a seeded random init."""
    model, _ = load_model(config["checkpoint"])
    if init == "global":
        return model.exits.state_dict()
    arch = dict(config["architecture"])
    arch["input_shape"] = tuple(arch["input_shape"])
    torch.manual_seed(config["seed"])
    fresh = build_multi_exit(MultiExitSpec(**arch))
    return fresh.exits.state_dict()


def federated_exits(grid: Grid, config: dict, node_of: dict[int, int], num_held_out: int):
    """FedAvg rounds over the exits only (from a random init), across clients of the global
    population. Returns the exit weights and the per-round record (loss, failures)."""
    fed = config["federated"]
    global_nodes = [node_of[p] for p in sorted(node_of) if p >= num_held_out]  # partition order
    strategy = SeededFedAvg(global_nodes, int(fed["clients_per_round"]), seed=config["seed"])
    result = strategy.start(
        grid,
        initial_arrays=ArrayRecord(initial_exits(config, "federated")),
        num_rounds=int(fed["rounds"]),
        train_config=ConfigRecord({"run-config": json.dumps(config)}),
        timeout=float(config["simulation"]["timeout_s"]),
    )
    if not result.train_metrics_clientapp:
        first = strategy.errors[0][1] if strategy.errors else "no replies"
        raise RuntimeError(f"federated exit training: no round succeeded ({first})")
    history = {
        "train_loss": {r: float(m["train-loss"]) for r, m in result.train_metrics_clientapp.items()},
        "failures": [{"round": r, "error": e} for r, e in strategy.errors],
    }
    return result.arrays.to_torch_state_dict(), history


def one_line_reason(reason: str) -> str:
    """Flower wraps a ClientApp's exception in a Ray traceback; keep the exception's message."""
    marker = "Message:"
    if marker in reason:
        reason = reason.rsplit(marker, 1)[1]
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def to_record(init: str, user: str, reply: Message) -> dict:
    if reply.has_error():
        return {"user": user, "init": init, "result": None, "error": one_line_reason(reply.error.reason)}
    info = reply.content["info"]
    result = {key: (list(v) if isinstance(v, list) else v) for key, v in reply.content["result"].items()}
    return {
        "user": str(info["user"]),
        "init": init,
        "result": result,
        "error": None,
        "notes": json.loads(str(info["notes"])),
    }


def run_study(grid: Grid, config: dict, users: list[str], num_held_out: int) -> dict:
    """All inits on the same sampled held-out users. `users[p]` is partition p's user.
    Returns {"records": [...], "federated": history or None}."""
    sim = config["simulation"]
    nodes = wait_for_nodes(grid, len(users), float(sim["registration_timeout_s"]))
    node_of = discover_partitions(grid, nodes)
    partition_of = {node: p for p, node in node_of.items()}
    chosen = sample_users(num_held_out, sim.get("num_users"), config["seed"])
    run_config = json.dumps(config)
    records, federated = [], None
    for init in config["init"]["inits"]:
        if init == "federated":
            exits, federated = federated_exits(grid, config, node_of, num_held_out)
        else:
            exits = initial_exits(config, init)
        arrays = ArrayRecord(exits)
        messages = [
            Message(
                RecordDict(
                    {"arrays": arrays, "config": ConfigRecord({"init": init, "run-config": run_config})}
                ),
                dst_node_id=node_of[p],
                message_type=MessageType.EVALUATE,
            )
            for p in chosen
        ]
        replies = send_with_progress(
            grid,
            messages,
            f"personalising ({init})",
            max_in_flight=int(sim["max_in_flight"]),
            timeout_s=float(sim["timeout_s"]),
        )
        records += [to_record(init, users[partition_of[r.metadata.src_node_id]], r) for r in replies]
    records.sort(key=lambda r: (config["init"]["inits"].index(r["init"]), r["user"]))
    return {"records": records, "federated": federated}


def make_server_app(
    config: dict, users: list[str], num_held_out: int, sink: Callable[[dict], None]
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        sink(run_study(grid, config, users, num_held_out))

    return app


app = ServerApp()


@app.main()
def deployment_main(grid: Grid, context: Context) -> None:
    """`flwr run .`: compose the config from the run config's `overrides`, prepare data and the
    global model, run the study and write the report into `output-dir`."""
    from ..simulate import compose_config, prepare, write_results

    config = compose_config(str(context.run_config.get("overrides", "")).split())
    prepared = prepare(config)
    outcome = run_study(grid, prepared.config, prepared.users, prepared.num_held_out)
    write_results(str(context.run_config.get("output-dir", "outputs/flwr")), prepared, outcome)
