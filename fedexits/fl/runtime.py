"""The one place that starts Flower's Simulation Engine for `python -m fedexits.simulate`.

Flower 1.41 runs a ServerApp and its ClientApps in this process through
`flwr.simulation.run_simulation`, which it marks deprecated in favour of `flwr run` (a SuperLink
that launches the apps in processes of its own). Both run the same `ServerApp`/`ClientApp`
(`fedexits.fl.server_app`, `fedexits.fl.client_app`), and `flwr run .` is the documented
replacement (README, "flwr run"). The deprecated call is confined to `run_in_simulation_engine`
below, so replacing it touches nothing else; its warning, which a user of this tool can do nothing
about, is filtered here rather than printed on every run.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from flwr.serverapp import Grid

from ..study.prepare import Prepared
from ..study.results import RunOutcome

log = logging.getLogger(__name__)
T = TypeVar("T")

# Flower messages that say nothing to a user of this tool (each run would print them).
_QUIET = (
    "run_simulation` function is deprecated",
    "Manually terminating ClientAppActor",
    "fraction_evaluate is set to 0.0",  # lifecycle mode uses FedAvg for its aggregation only
)


class _DropFlowerNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _QUIET)


def backend_config(prepared: Prepared) -> dict:
    sim = prepared.plan.settings.simulation
    init_args = {"logging_level": "error", **sim.ray_init_args}
    # Ray's default (no address) joins the latest cluster started on this machine, so a run would
    # silently land on someone's `ray start` cluster: join one only when asked to.
    init_args["address"] = sim.ray_address or init_args.get("address", "local")
    return {
        "client_resources": {"num_cpus": float(sim.client_cpus), "num_gpus": float(sim.client_gpus)},
        "init_args": init_args,
    }


def run_in_simulation_engine(prepared: Prepared) -> RunOutcome:
    """Run the study with one Flower virtual client per user (Ray backend) in this process."""
    from .server_app import make_server_app

    outcomes: list[RunOutcome] = []
    stopped = threading.Event()  # tells the ServerApp's thread that the backend has gone
    _simulate(prepared, make_server_app(prepared, outcomes.append, stopped), stopped)
    if not outcomes:
        raise RuntimeError("the Flower simulation ended without results (see the log above)")
    return outcomes[0]


def run_with_clients(prepared: Prepared, work: Callable[[Grid, dict[int, int]], T]) -> T:
    """`work(grid, node_of)` as the ServerApp of a simulation with one virtual client per
    partition of `prepared` (node_of: partition id -> node id), for experiments that drive the
    clients themselves (e.g. several federated budgets in one Ray session)."""
    from flwr.serverapp import ServerApp

    from .server_app import connect_clients

    results: list[T] = []
    stopped = threading.Event()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:
        results.append(work(grid, connect_clients(grid, prepared, stopped)))

    _simulate(prepared, app, stopped)
    if not results:
        raise RuntimeError("the Flower simulation ended without results (see the log above)")
    return results[0]


def run_lifecycle_in_simulation_engine(prepared: Prepared):
    """Lifecycle mode (one round = one day; fl/lifecycle_*.py): returns a LifecycleOutcome."""
    from .lifecycle_server import make_lifecycle_server_app

    outcomes: list = []
    stopped = threading.Event()
    _simulate(prepared, make_lifecycle_server_app(prepared, outcomes.append, stopped), stopped)
    if not outcomes:
        raise RuntimeError("the Flower simulation ended without results (see the log above)")
    return outcomes[0]


def _simulate(prepared: Prepared, server_app, stopped: threading.Event) -> None:
    """The one call of Flower's simulation engine, its chatter filtered."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from .client_app import app as client_app

    flower = logging.getLogger("flwr")
    flower.propagate = False  # Flower prints its own INFO lines once
    noise = _DropFlowerNoise()
    for handler in flower.handlers:
        handler.addFilter(noise)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(prepared.users),
            backend_config=backend_config(prepared),
        )
    finally:
        stopped.set()
        for handler in flower.handlers:
            handler.removeFilter(noise)
