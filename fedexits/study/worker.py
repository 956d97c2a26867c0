"""What a client process keeps between messages: the population index, the frozen model, its cost
table and latency profile, built once per process from the run plan that every message carries,
so hundreds of virtual clients share two actors' worth of memory.

No Flower here: the ClientApp and the plain in-process loop (benchmarks, notebooks) run the same
`Worker` methods, so they compute the same thing.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field

import torch
from rich.progress import track

from ..data import Population, build_population
from ..engine import PRUNING_METHODS, exits_file, load_model, save_exits
from ..engine.device import resolve_device
from ..engine.features import FeatureStore, FrozenFeatures
from ..engine.inference import exit_accuracies
from ..engine.local_training import LocalTrainingConfig, train_exits_locally
from ..errors import UserDataError, one_line
from ..models import cost_table
from ..report.records import Failure, UserRecord
from .plan import RunPlan, partition_users
from .prepare import profile_latency
from .protocol import run_pruning_user, run_user, user_seed


@dataclass
class Worker:
    plan: RunPlan
    population: Population
    users: list[str]  # partition id -> user
    model: torch.nn.Module
    cost_table: object
    features: FeatureStore | None = field(default=None, repr=False)  # federated clients' frozen features
    _shared_state: dict | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        # The baselines `final` and `full` train more than the exits: every user must start from
        # the shared backbone and final classifier, not from the previous user's fine-tuned copy.
        # (The pruning methods work on a copy and never change the shared model.)
        if {"final", "full"} & set(self.plan.settings.personalisation.methods):
            self._shared_state = {
                name: tensor.clone()
                for name, tensor in self.model.state_dict().items()
                if not name.startswith("exits.")
            }
        if self.features is None:
            self.features = FeatureStore(self.plan.settings.federated.feature_cache_mb)

    @functools.cached_property
    def latency(self):
        """Per-exit latency: the profile measured once for the run, or (a real device without
        one) measured here once."""
        profile = self.plan.latency or profile_latency(self.model, self.plan.settings.latency)[0]
        return profile.costs()

    def load_exits(self, state: dict[str, torch.Tensor]) -> None:
        """The shared model with these exits (resets whatever the previous user changed)."""
        if self._shared_state is not None:
            self.model.load_state_dict(self._shared_state, strict=False)
        self.model.exits.load_state_dict(state)

    def personalise_user(
        self, user: str, exits: dict[str, torch.Tensor], init: str, method: str | None = None
    ) -> UserRecord:
        """The protocol of `method` (default: the run's personalisation.method) for one held-out
        user, starting from `exits`. Raises UserDataError when the user's data cannot work."""
        settings = self.plan.settings
        p = settings.personalisation
        method = method or p.method
        if method not in p.methods:
            raise ValueError(f"method {method!r} is not one of this run's methods {p.methods}")
        data = self.population.load_user(
            user, label_fraction=p.label_fraction, seed=user_seed(settings.seed, user)
        )
        self.load_exits(exits)
        train, test = (data.train_x, data.train_y, data.labelled), (data.test_x, data.test_y)
        config = p.for_user(user_seed(settings.seed, user))
        memory = settings.simulation.profile_memory
        if method in PRUNING_METHODS:
            result = run_pruning_user(
                self.model,
                self.cost_table,
                train,
                test,
                config,
                p.pruning_config(),
                method,
                self.latency,
                settings.latency,
                memory,
                self.plan.channel_shares(),
            )
        else:
            result = run_user(
                self.model,
                self.cost_table,
                train,
                test,
                config,
                settings.calibration,
                method,
                self.latency,
                memory,
            )
        if settings.simulation.save_exits and method == "exits" and self.plan.run_dir:
            save_exits(
                exits_file(self.plan.run_dir, user, init),
                self.model,
                result.threshold,
                [bool(a) for a in result.active_exits],
                user=user,
                init=init,
                accuracy_at_threshold=result.accuracy_at_threshold,
            )
        return UserRecord(user, init, result, notes=list(data.notes), method=method)

    def client_features(self, user: str) -> tuple[FrozenFeatures, torch.Tensor, bool]:
        """A federated client's frozen-backbone features and labels over all its images (central
        training saw all of them too), and whether they were kept from an earlier round. Only
        global users are federated clients: a held-out user's data is for personalisation."""
        if user in self.held_out:
            raise ValueError(f"user {user} is held out for personalisation; it is no federated client")
        cached = user in self.features

        def compute():
            data = self.population.load_user(
                user, label_fraction=1.0, seed=user_seed(self.plan.settings.seed, user)
            )
            x, y = torch.cat([data.train_x, data.test_x]), torch.cat([data.train_y, data.test_y])
            return FrozenFeatures(self.model, x), y

        features, labels = self.features.get(user, compute)
        return features, labels, cached

    def train_user(
        self, user: str, exits: dict[str, torch.Tensor], server_round: int, proximal_mu: float = 0.0
    ):
        """One client's local exit training in a federated round (labels, no guard), on its
        features kept across rounds. Returns a `LocalUpdate`."""
        settings = self.plan.settings
        fed = settings.federated
        features, labels, cached = self.client_features(user)
        self.load_exits(exits)
        local = LocalTrainingConfig(
            epochs=fed.local_epochs,
            lr=fed.lr,
            batch_size=fed.batch_size,
            proximal_mu=proximal_mu,
            seed=user_seed(settings.seed, user, "round", server_round),
        )
        losses = train_exits_locally(self.model, features, labels, local)
        exits = {name: tensor.cpu() for name, tensor in self.model.exits.state_dict().items()}
        return LocalUpdate(exits, len(labels), losses[-1], cached)

    def evaluate_exits(self, user: str, exits: dict[str, torch.Tensor]) -> tuple[int, list[float]]:
        """Federated evaluation on a global user kept out of training: every exit's accuracy
        over all its images (the final exit's last). Returns (images, accuracies)."""
        features, labels, _ = self.client_features(user)
        self.load_exits(exits)
        return len(labels), exit_accuracies(features.exit_probabilities(self.model), labels)

    @functools.cached_property
    def held_out(self) -> frozenset[str]:
        return frozenset(self.population.held_out_users)


@dataclass
class LocalUpdate:
    """A client's reply in a training round."""

    exits: dict[str, torch.Tensor]
    num_examples: int
    loss: float  # the last local epoch's mean loss
    features_cached: bool  # its frozen features were kept from an earlier round in this process


@functools.lru_cache(maxsize=2)
def get_worker(plan_json: str) -> Worker:
    """This process's worker for a plan (built on the first message, then reused)."""
    plan = RunPlan.from_json(plan_json)
    population = build_population(plan.settings.dataset)
    model, _ = load_model(plan.checkpoint)
    costs = cost_table(model)
    model.to(resolve_device(plan.settings.device))  # Ray's GPU for this client, with "auto"
    include_global = "federated" in plan.settings.init.inits
    users = partition_users(population, include_global)
    return Worker(plan, population, users, model, costs, features=shared_feature_store(plan))


_FEATURE_STORES: dict[str, FeatureStore] = {}


def shared_feature_store(plan: RunPlan) -> FeatureStore:
    """This process's store of client features for the plan's global model and population: the
    features depend on nothing else, so runs that differ only in their federated settings (a
    budget sweep in one Flower session) share them."""
    key = json.dumps([plan.checkpoint, asdict(plan.settings.dataset)], sort_keys=True, default=str)
    if key not in _FEATURE_STORES:
        _FEATURE_STORES.clear()  # one global model at a time: free the previous one's features
        _FEATURE_STORES[key] = FeatureStore(plan.settings.federated.feature_cache_mb)
    return _FEATURE_STORES[key]


def run_users_in_process(
    plan: RunPlan,
    users: list[str],
    exits: dict[str, torch.Tensor],
    init: str = "global",
    progress: bool = True,
    method: str | None = None,
) -> list[UserRecord]:
    """The same per-user work as the Flower clients, in a plain loop in this process (the
    baseline for the simulation-overhead benchmark, and handy in notebooks)."""
    worker = get_worker(plan.to_json())
    method = method or plan.settings.personalisation.method
    records = []
    description = f"personalising ({init}, {method}, in process)"
    for user in track(users, description=description, disable=not progress):
        try:
            records.append(worker.personalise_user(user, exits, init, method))
        except UserDataError as exc:
            failure = Failure("user", f"user {user}: {one_line(exc)}")
            records.append(UserRecord(user, init, failure=failure, method=method))
    return records
