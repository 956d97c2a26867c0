"""python -m fedexits.simulate — personalise a population of users as Flower virtual clients.

Steps: build (or reuse) the data cache, train (or reuse) the global multi-exit model, run the
Flower simulation (one virtual client per user, Ray backend), write the report into Hydra's run
directory. Settings live in conf/ (Hydra groups: dataset, model, global_training,
personalisation, init, simulation).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data import DataError, build_population
from .engine import TrainConfig, train_global
from .fl.worker import partition_users, personalisation_from_config, profile_latency
from .models import MultiExitSpec, build_multi_exit, cost_table
from .report import write_run_report
from .report.files import atomic_write_csv, atomic_write_text
from .report.results import build_frames

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXPECTED_ERRORS = (DataError, ValueError, FileNotFoundError, RuntimeError, OmegaConfBaseException)
TIMING_COLUMNS = ("latency_ms", "personalise_s", "expected_latency_ms", "latency_speedup", "peak_memory_mb")


@dataclass
class Prepared:
    """Everything the Flower run needs, resolved before Ray starts."""

    config: dict  # plain, JSON-able; includes "checkpoint" and "architecture"
    users: list[str]  # partition id -> user id
    num_held_out: int
    cost_table: object
    population: dict
    training: dict
    timings: dict = field(default_factory=dict)


def to_plain(cfg: DictConfig) -> dict:
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    config.pop("hydra", None)
    return config


def compose_config(overrides: list[str]) -> dict:
    """The Hydra config for `overrides`, without running the Hydra app (used by `flwr run`)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return to_plain(compose("config", overrides=overrides))


def global_model_path(config: dict, spec: MultiExitSpec) -> Path:
    """Cached global model, keyed by everything that shapes it."""
    key = json.dumps(
        {
            "dataset": config["dataset"],
            "model": {**spec.architecture(), "weights": spec.weights},
            "training": config["global_training"],
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(config["cache_dir"]).expanduser() / "models" / f"{spec.backbone}-{digest}.pt"


def prepare(config: dict, progress: bool = True) -> Prepared:
    """Build the population cache and the global model (trained once, then reused)."""
    started = time.perf_counter()
    personalisation_from_config(config)  # reject bad settings before any work
    population = build_population(config["dataset"])
    data_s = time.perf_counter() - started
    m = config["model"]
    spec = MultiExitSpec(
        backbone=m["backbone"],
        num_classes=population.num_classes,
        num_exits=int(m["num_exits"]),
        width_mult=m.get("width_mult"),
        head_channels=m.get("head_channels"),
        input_shape=tuple(population.input_shape),
        weights=m.get("weights"),
    )
    if (
        spec.weights == "imagenet"
        and spec.num_classes != 1000
        and config["global_training"]["mode"] == "exits_only"
    ):
        raise ValueError(
            f"the final classifier is new ({spec.num_classes} classes, not ImageNet's 1000) and would "
            "stay random with global_training.mode=exits_only; use exits_and_classifier"
        )
    path = global_model_path(config, spec)
    model = build_multi_exit(spec)
    train_config = TrainConfig(**config["global_training"])
    trained = time.perf_counter()
    history = train_global(
        model,
        population.global_train_set(),
        train_config,
        path,
        progress=progress,
        extra={"dataset": config["dataset"]},
    )
    include_global = "federated" in config["init"]["inits"]
    # Every virtual client shares this machine: profile latency once, quietly, before Ray starts
    # (clients measuring themselves would disturb each other).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(config["simulation"]["client_cpus"])))  # as a client runs
    try:
        latency = profile_latency(model, int(config["simulation"]["latency_repeats"]))
    finally:
        torch.set_num_threads(threads)
    config = {**config, "checkpoint": str(path), "architecture": spec.architecture(), "latency": latency}
    return Prepared(
        config=config,
        users=partition_users(population, include_global),
        num_held_out=len(population.held_out_users),
        cost_table=cost_table(model),
        population=population.describe(),
        training={
            "checkpoint": str(path),
            "epoch_loss": history["epoch_loss"],
            "train_seconds": history["seconds"],
        },
        timings={"data_s": data_s, "global_model_s": time.perf_counter() - trained},
    )


def backend_config(sim: dict) -> dict:
    init_args = {"logging_level": "error", **(sim.get("ray_init_args") or {})}
    if sim.get("ray_address"):
        init_args["address"] = sim["ray_address"]
    return {
        "client_resources": {"num_cpus": float(sim["client_cpus"]), "num_gpus": float(sim["client_gpus"])},
        "init_args": init_args,
    }


def run_flower(prepared: Prepared) -> dict:
    """The Flower simulation; returns {"records": [...], "federated": {...} or None}."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").propagate = False  # Flower prints its own INFO lines once

    from .fl.client_app import app as client_app
    from .fl.server_app import make_server_app

    outcome: dict = {}
    server_app = make_server_app(prepared.config, prepared.users, prepared.num_held_out, outcome.update)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=len(prepared.users),
        backend_config=backend_config(prepared.config["simulation"]),
    )
    if "records" not in outcome:
        raise RuntimeError("the Flower simulation ended without results (see the log above)")
    return outcome


def write_results(out_dir: str | Path, prepared: Prepared, outcome: dict) -> dict:
    frames = build_frames(outcome["records"], prepared.cost_table)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(prepared.cost_table, out_dir / "cost_table.csv")
    meta = {
        "seed": prepared.config["seed"],
        "dataset": prepared.population,
        "model": prepared.config["architecture"],
        "personalisation": prepared.config["personalisation"],
        "inits": prepared.config["init"]["inits"],
        "drop_tolerance_pp": prepared.config["personalisation"]["drop_tolerance_pp"],
        "global_training": prepared.training,
        "federated": outcome.get("federated"),
        "timings": prepared.timings,
    }
    return write_run_report(
        out_dir, frames["per_user"], frames["thresholds"], frames["sweep"], frames["failures"], meta
    )


def simulate(config: dict, out_dir: str | Path) -> dict:
    """The whole pipeline; returns the summary written to out_dir/summary.json."""
    started = time.perf_counter()
    prepared = prepare(config)
    simulation_started = time.perf_counter()
    outcome = run_flower(prepared)
    prepared.timings["simulation_s"] = time.perf_counter() - simulation_started
    prepared.timings["total_s"] = time.perf_counter() - started
    return write_results(out_dir, prepared, outcome)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        summary = simulate(to_plain(cfg), out_dir)
    except EXPECTED_ERRORS as exc:
        # One clear line, no traceback; a sweep job fails alone (error.txt) and the sweep goes on.
        message = one_line(exc)
        atomic_write_text(out_dir / "error.txt", message + "\n")
        print(f"error: {message}", file=sys.stderr)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            sys.exit(2)
        return
    from .report.console import print_summary

    print_summary(summary, out_dir)


if __name__ == "__main__":
    main()
