"""What a client process keeps between messages: the population index, the frozen model, its cost
table and latency profile. Built once per process from the run config that every message
carries, so hundreds of virtual clients share two actors' worth of memory.

No Flower here: the ClientApp and the plain in-process loop (benchmarks, experiments) run the
same `Worker` methods, so they compute the same thing.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import torch

from ..data import Population, build_population
from ..engine import (
    ExitCosts,
    PersonalisationConfig,
    fold_batchnorm,
    latency_costs,
    load_model,
    measure_latency,
    personalise,
)
from ..engine.protocol import UserProtocol, personalisation_for_user, run_user, user_seed
from ..models import cost_table


def partition_users(population: Population, include_global: bool) -> list[str]:
    """Partition id -> user: held-out users first, then (for federated rounds) global users."""
    users = list(population.held_out_users)
    if include_global:
        users += list(population.global_users)
    return users


@dataclass
class Worker:
    config: dict
    population: Population
    users: list[str]
    model: torch.nn.Module
    cost_table: object
    personalisation: PersonalisationConfig
    protocol: UserProtocol
    _latency: object = None
    _shared_state: dict | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        # The baselines `final` and `full` train more than the exits: every user must start from
        # the shared backbone and final classifier, not from the previous user's fine-tuned copy.
        if self.protocol.method in ("final", "full"):
            self._shared_state = {
                name: tensor.clone()
                for name, tensor in self.model.state_dict().items()
                if not name.startswith("exits.")
            }

    @property
    def latency(self):
        """Per-exit latency (batch 1): the profile measured once for the run (`latency` in the
        config, see `profile_latency`), or, without one (a real device), measured here once."""
        if self._latency is None:
            profile = self.config.get("latency") or profile_latency(
                self.model, int(self.config["simulation"]["latency_repeats"])
            )
            self._latency = ExitCosts(profile["backbone"], profile["heads"])
        return self._latency

    def load_exits(self, state: dict[str, torch.Tensor]) -> None:
        """The shared model with these exits (resets whatever the previous user changed)."""
        if self._shared_state is not None:
            self.model.load_state_dict(self._shared_state, strict=False)
        self.model.exits.load_state_dict(state)

    def personalise_user(self, user: str, exits: dict[str, torch.Tensor]) -> dict:
        """The paper's protocol for one held-out user, starting from `exits`. Returns a record
        (see fedexits.report.results); raises DataError/ValueError for bad data or settings."""
        seed = self.config["seed"]
        label_fraction = float(self.config["personalisation"]["label_fraction"])
        data = self.population.load_user(user, label_fraction=label_fraction, seed=user_seed(seed, user))
        self.load_exits(exits)
        result = run_user(
            self.model,
            self.cost_table,
            (data.train_x, data.train_y, data.labelled),
            (data.test_x, data.test_y),
            personalisation_for_user(self.personalisation, seed, user),
            self.protocol,
            latency=self.latency,
        )
        result["latency_ms"] = [b + h for b, h in zip(self.latency.backbone, self.latency.heads)]
        return {"user": user, "result": result, "error": None, "notes": list(data.notes)}

    def train_user(self, user: str, exits: dict[str, torch.Tensor], server_round: int):
        """One client's local exit training in a FedAvg round (labels, no guard).
        Returns (exit state, number of examples, last epoch's loss)."""
        fed = self.config["federated"]
        seed = self.config["seed"]
        data = self.population.load_user(user, label_fraction=1.0, seed=user_seed(seed, user))
        self.load_exits(exits)
        local = PersonalisationConfig(
            alpha=1.0,
            beta=0.0,
            gamma=0.0,
            epochs=int(fed["local_epochs"]),
            lr=float(fed["lr"]),
            batch_size=int(fed["batch_size"]),
            guard=False,
            seed=user_seed(seed + server_round, user),
        )
        result = personalise(self.model, data.train_x, data.train_y, data.labelled, local)
        return self.model.exits.state_dict(), data.n_train, result.epoch_losses[-1]


def profile_latency(model, repeats: int) -> dict:
    """Per-exit latency at batch 1 of the model as a device runs it (BatchNorm folded), in the
    calibration's form: prefix to each attach point and each head, in ms."""
    costs = latency_costs(measure_latency(fold_batchnorm(model), batch_sizes=(1,), repeats=repeats))
    return {"backbone": list(costs.backbone), "heads": list(costs.heads)}


def personalisation_from_config(config: dict) -> tuple[PersonalisationConfig, UserProtocol]:
    p = dict(config["personalisation"])
    protocol = UserProtocol(
        method=p.pop("method", "exits"),
        drop_tolerance_pp=float(p.pop("drop_tolerance_pp", 1.0)),
        prune_exits=bool(p.pop("prune_exits", True)),
        profile_memory=bool(config["simulation"].get("profile_memory", False)),
        calibration_margin_z=float(p.pop("calibration_margin_z", 0.0)),
    )
    label_fraction = p.pop("label_fraction", 1.0)
    if not 0.0 <= float(label_fraction) <= 1.0:
        raise ValueError(f"personalisation label_fraction must be in [0, 1], got {label_fraction}")
    preset = p.pop("preset", "default")
    personalisation = PersonalisationConfig.preset(preset, **p)
    if protocol.method == "exits":  # a loss that is zero for every user fails the run, not each user
        fraction = float(label_fraction)
        try:
            personalisation.loss_weights().check_active(int(fraction > 0), int(fraction < 1))
        except ValueError:
            a, b, g = personalisation.alpha, personalisation.beta, personalisation.gamma
            raise ValueError(
                f"personalisation loss is zero for every sample at label_fraction={fraction}: "
                f"alpha={a} weighs labelled samples, gamma={g} unlabelled ones, beta={b} all"
            ) from None
    return personalisation, protocol


@functools.lru_cache(maxsize=2)
def get_worker(run_config_json: str) -> Worker:
    config = json.loads(run_config_json)
    population = build_population(config["dataset"])
    model, _ = load_model(config["checkpoint"])
    personalisation, protocol = personalisation_from_config(config)
    include_global = "federated" in config["init"]["inits"]
    return Worker(
        config=config,
        population=population,
        users=partition_users(population, include_global),
        model=model,
        cost_table=cost_table(model),
        personalisation=personalisation,
        protocol=protocol,
    )


def run_users_in_process(
    config: dict,
    users: list[str],
    exits: dict[str, torch.Tensor],
    init: str = "global",
    progress: bool = True,
) -> list[dict]:
    """The same per-user work as the Flower clients, in a plain loop in this process (the
    baseline for the simulation-overhead benchmark, and handy in notebooks)."""
    from rich.progress import track

    from ..data import DataError

    worker = get_worker(json.dumps(config))
    records = []
    for user in track(users, description=f"personalising ({init}, in process)", disable=not progress):
        try:
            record = worker.personalise_user(user, exits)
        except (DataError, ValueError, FileNotFoundError) as exc:
            record = {"user": user, "result": None, "error": f"user {user}: {exc}"}
        records.append({**record, "init": init})
    return records
