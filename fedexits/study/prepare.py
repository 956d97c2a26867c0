"""Preparing a run before any client starts: the data cache, the global model (trained once from
the seed, then reused), and the latency profile."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..atomic import atomic_write
from ..data import build_population
from ..data.split import read_held_out_file
from ..engine import LatencySettings, latency_costs, load_model, profile_exit_latency, train_global
from ..engine.device import resolve_device
from ..engine.pruning import PRUNING_METHODS, channel_shares
from ..engine.saved_exits import EXITS_DIR
from ..errors import SettingsError
from ..models import MultiExitSpec, build_multi_exit, cost_table
from ..models.costs import training_flops
from .config import StudyConfig
from .plan import LatencyProfile, RunPlan, lifecycle_partition_users, partition_users


@dataclass
class Prepared:
    """Everything the run needs, resolved in the driver before Ray starts."""

    plan: RunPlan
    users: list[str]  # partition id -> user
    num_held_out: int
    cost_table: pd.DataFrame
    population: dict  # Population.describe()
    training: dict  # checkpoint, epoch losses, seconds, images per epoch
    latency_table: pd.DataFrame | None = None  # per exit and batch size, as measured
    timings: dict = field(default_factory=dict)
    exit_buffers: list[str] = field(default_factory=list)  # running statistics among the exits' arrays
    flops_per_image: dict = field(default_factory=dict)  # training costs, see `training_costs`


def global_model_path(settings: StudyConfig, spec: MultiExitSpec) -> Path:
    """Cached global model, keyed by everything that shapes it (data, network, training, seed).
    A held-out file counts by the users it lists, not by where it lies."""
    dataset = asdict(settings.dataset)
    if dataset.get("held_out_file"):
        dataset["held_out_file"] = sorted(read_held_out_file(dataset["held_out_file"]))
    key = json.dumps(
        {
            "dataset": dataset,
            "model": {**spec.architecture(), "weights": spec.weights},
            "training": asdict(settings.global_training),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(settings.cache_dir) / "models" / f"{spec.backbone}-{digest}.pt"


def profile_latency(model, settings: LatencySettings) -> tuple[LatencyProfile, pd.DataFrame]:
    """Per-exit latency of the model as a device runs it (ONNX Runtime by default, BatchNorm
    folded, `settings.threads` threads): the batch-1 profile in the calibration's form, and the
    whole table (every batch size)."""
    table = profile_exit_latency(model, settings)
    costs = latency_costs(table, batch_size=1)
    profile = LatencyProfile(list(costs.backbone), list(costs.heads), settings.runtime, settings.threads)
    return profile, table


GLOBAL_MODEL_FILE = "global_model.pt"  # the run's copy of the global checkpoint, under RUN_DIR/exits/


def prepare(settings: StudyConfig, progress: bool = True, run_dir: str | Path | None = None) -> Prepared:
    """Build the population cache and the global model (trained once from the seed, then
    reused), and profile latency once (clients measuring themselves would disturb each other).
    With `run_dir` and `simulation.save_exits`, the run keeps its own copy of the global model
    next to the users' exits (RUN_DIR/exits/), so it can be exported after the cache is gone."""
    device = resolve_device(settings.device)  # a missing GPU fails here, before any work
    started = time.perf_counter()
    population = build_population(settings.dataset)
    data_s = time.perf_counter() - started
    if "federated" in settings.init.inits:
        settings.federated.check_population(len(population.global_users))
    spec = MultiExitSpec.from_config(settings.model, population.num_classes, population.input_shape)
    training = settings.global_training
    if spec.weights == "imagenet" and spec.num_classes != 1000 and training.mode == "exits_only":
        raise SettingsError(
            f"global_training.mode must train the classifier (exits_and_classifier): the final "
            f"classifier is new ({spec.num_classes} classes, not ImageNet's 1000) and would stay random"
        )
    path = global_model_path(settings, spec)
    model = build_multi_exit(spec, seed=training.seed)
    prune_shares = None
    if set(settings.personalisation.methods) & set(PRUNING_METHODS):  # the architecture's: no training
        p = settings.personalisation
        shares = channel_shares(model, p.pruned_levels, p.prune_round_to)  # refuses a bad level
        prune_shares = {str(level): asdict(share) for level, share in shares.items()}
    trained = time.perf_counter()
    global_set = population.global_train_set()
    history = train_global(
        model,
        global_set,
        training,
        path,
        progress=progress,
        extra={"dataset": asdict(settings.dataset)},
        device=device,
    )
    model.cpu()  # costs, latency (ONNX Runtime) and the clients start from the CPU copy
    global_model_s = time.perf_counter() - trained
    profiled = time.perf_counter()
    latency, latency_table = profile_latency(model, settings.latency)
    latency_s = time.perf_counter() - profiled
    include_global = "federated" in settings.init.inits
    if run_dir is not None and settings.simulation.save_exits:
        copy = Path(run_dir) / EXITS_DIR / GLOBAL_MODEL_FILE
        copy.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(copy, lambda handle: handle.write(path.read_bytes()), "wb")
    lifecycle = settings.mode == "lifecycle"
    users = (
        lifecycle_partition_users(population, settings.simulation.num_users, settings.seed)
        if lifecycle
        else partition_users(population, include_global)
    )
    return Prepared(
        plan=RunPlan(
            settings,
            str(path),
            spec.architecture(),
            latency,
            None if run_dir is None else str(run_dir),
            prune_shares,
        ),
        users=users,
        num_held_out=len(users) if lifecycle else len(population.held_out_users),
        cost_table=cost_table(model),
        population=population.describe(),
        training={
            "checkpoint": str(path),
            "epoch_loss": history["epoch_loss"],
            "train_seconds": history["seconds"],
            "made_with": history.get("made_with", ["not recorded"]),
            "images": len(global_set),
        },
        latency_table=latency_table,
        timings={"data_s": data_s, "global_model_s": global_model_s, "latency_profile_s": latency_s},
        exit_buffers=[name for name, _ in model.exits.named_buffers()],
        flops_per_image=training_costs(model),
    )


def training_costs(model) -> dict:
    """FLOPs per image of each way the exits get trained (`models.costs.training_flops`), and of
    the frozen-feature pass (the whole network without the exits' heads)."""
    table = cost_table(model)
    costs = {
        trains: training_flops(model, trains)
        for trains in ("all", "exits", "exits_and_classifier", "exit_heads")
    }
    return {**costs, "features": float(table["mflops"].iloc[-1]) * 1e6}


def initial_exits(plan: RunPlan, init: str) -> dict[str, torch.Tensor]:
    """The exit weights an init starts from: central training (global) or a random init from
    the seed (federated rounds and scratch)."""
    if init == "global":
        model, _ = load_model(plan.checkpoint)
        return model.exits.state_dict()
    arch = {**plan.architecture, "input_shape": tuple(plan.architecture["input_shape"])}
    return build_multi_exit(MultiExitSpec(**arch), seed=plan.settings.seed).exits.state_dict()
