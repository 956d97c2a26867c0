"""The typed plan of a run, and which users take part.

A `RunPlan` is the validated settings plus what preparing them produced: the global model's
checkpoint, its architecture and the latency profile. It travels to every Flower client as JSON,
so a client process rebuilds exactly the driver's view of the run.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass

from ..data import Population
from ..data.split import stable_seed
from ..engine.calibration import ExitCosts
from ..engine.channel_pruning import ChannelShare
from .config import StudyConfig, settings_from_dict, settings_to_dict


@dataclass
class LatencyProfile:
    """Per-exit latency (ms per sample, batch 1) in the calibration's form: the prefix of the
    network up to each attach point (`backbone`, M+1 values) and each head (`heads`, M+1: the last
    is the final classifier); `runtime` and `threads` say how it was measured."""

    backbone: list[float]
    heads: list[float]
    runtime: str = "onnxruntime"
    threads: int = 1

    def costs(self) -> ExitCosts:
        return ExitCosts(self.backbone, self.heads)


@dataclass
class RunPlan:
    settings: StudyConfig
    checkpoint: str  # the global multi-exit model
    architecture: dict  # MultiExitSpec.architecture() of that model
    latency: LatencyProfile | None = None  # measured once for the run; None: each worker measures
    run_dir: str | None = None  # where a run keeps per-user files (simulation.save_exits)
    # Pruning methods: the shares of the layers' channels removed at each level (str(level) ->
    # ChannelShare as a dict), computed once for the architecture by `engine.channel_shares`
    # (which refuses an unreachable level before any user).
    prune_shares: dict[str, dict] | None = None

    def channel_shares(self) -> dict[float, ChannelShare]:
        return {float(level): ChannelShare(**share) for level, share in (self.prune_shares or {}).items()}

    def jobs(self) -> list[tuple[str, str]]:
        """(init, method) pairs the users run: the method under every init, then each baseline
        under the first init (the baselines are compared with the method on the same users)."""
        inits, p = self.settings.init.inits, self.settings.personalisation
        return [(init, p.method) for init in inits] + [(inits[0], method) for method in p.baselines]

    def to_json(self) -> str:
        return json.dumps(
            {
                "settings": settings_to_dict(self.settings),
                "checkpoint": self.checkpoint,
                "architecture": self.architecture,
                "latency": None if self.latency is None else asdict(self.latency),
                "run_dir": self.run_dir,
                "prune_shares": self.prune_shares,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> RunPlan:
        data = json.loads(text)
        latency = LatencyProfile(**data["latency"]) if data.get("latency") else None
        settings = settings_from_dict(data["settings"])
        return cls(
            settings,
            data["checkpoint"],
            data["architecture"],
            latency,
            data.get("run_dir"),
            data.get("prune_shares"),
        )


def partition_users(population: Population, include_global: bool) -> list[str]:
    """Partition id -> user: held-out users first, then (for federated rounds) global users."""
    users = list(population.held_out_users)
    if include_global:
        users += list(population.global_users)
    return users


def lifecycle_partition_users(population: Population, num_users: int | None, seed: int) -> list[str]:
    """Lifecycle mode: partition id -> user for the seeded sample of held-out users who live the
    run, and only them: one virtual client each, none registered idle for the whole run."""
    held_out = list(population.held_out_users)
    return [held_out[p] for p in sample_users(len(held_out), num_users, seed)]


def sample_users(num_held_out: int, num_users: int | None, seed: int) -> list[int]:
    """Which held-out partitions take part: our seeded choice (Flower's sampler is not seeded)."""
    if num_users is None or num_users >= num_held_out:
        return list(range(num_held_out))
    return sorted(random.Random(seed).sample(range(num_held_out), num_users))


def federated_clients(
    num_held_out: int, num_global: int, eval_clients: int, seed: int
) -> tuple[list[int], list[int]]:
    """Partition ids of (training clients, evaluation clients) for federated exit training: both
    from the global population (partitions after the held-out users, see `partition_users`),
    disjoint; the evaluation clients are a seeded sample and never train. Held-out users, who are
    personalised later, are never among either."""
    global_partitions = list(range(num_held_out, num_held_out + num_global))
    rng = random.Random(stable_seed(seed, "federated evaluation clients"))
    evaluation = sorted(rng.sample(global_partitions, eval_clients))
    chosen = set(evaluation)
    return [p for p in global_partitions if p not in chosen], evaluation
