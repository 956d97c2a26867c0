"""Every setting of a study, defined once as dataclasses and registered as Hydra structured configs.

The command line (`python -m fedexits.simulate`), `flwr run` and notebooks build the same
objects: the dataclasses (here and in `engine`, `data`, `models`) hold every default and check
every value; `fedexits/conf/config.yaml` only wires the top-level `seed` and `cache_dir` into the
sections, and `fedexits/conf/experiment/` holds presets. `compose_config(overrides)` returns a
validated `StudyConfig`, so a bad setting fails before any data, model or Ray work starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..data.config import CONFIG_CLASSES, parse_config
from ..engine.calibration import CALIBRATION_PRESETS, CalibrationConfig
from ..engine.device import check_device_name
from ..engine.latency import LatencySettings
from ..engine.lifecycle_config import LifecycleConfig, check_buffer
from ..engine.personalise import METHODS, PRESETS, PersonalisationConfig
from ..engine.pruning import PRUNABLE_BACKBONES, PRUNING_METHODS, PruningConfig, check_finetune_budget
from ..engine.train import TRAIN_PRESETS, TrainConfig
from ..errors import SettingsError, UserDataError, check_settings, config_error_line
from ..models import MODEL_PRESETS, ModelConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
INITS = ("global", "federated", "scratch")
MODES = ("protocol", "lifecycle")  # one-shot personalisation, or users living through days
ALL_METHODS = (*METHODS, *PRUNING_METHODS)  # exits, final, full, none, prune_data, prune_agnostic


@dataclass
class PersonalisationSettings(PruningConfig, PersonalisationConfig):
    """The engine's personalisation settings (exits, and the pruning methods' `prune_*`), plus
    which methods the study runs on its users.

    `method` runs for every init of `init.inits`; each of `baselines` runs once more on the same
    users (with the first init) for comparison, in the same run."""

    method: str = "exits"  # one of engine.METHODS or engine.PRUNING_METHODS
    baselines: list[str] = field(default_factory=list)  # other methods, compared on the same users
    label_fraction: float = 1.0  # share of each user's personalisation images that carry labels

    def __post_init__(self):
        PersonalisationConfig.__post_init__(self)
        PruningConfig.__post_init__(self)
        self.baselines = list(self.baselines)
        names = ", ".join(ALL_METHODS)
        check_settings(
            "personalisation",
            self,
            [
                ("method", self.method in ALL_METHODS, "one of " + names),
                ("baselines", set(self.baselines) <= set(ALL_METHODS), "a list from " + names),
                ("baselines", len(set(self.baselines)) == len(self.baselines), "a list without repeats"),
                ("baselines", self.method not in self.baselines, f"other than the method ({self.method})"),
                ("label_fraction", 0 <= self.label_fraction <= 1, "in [0, 1]"),
            ],
        )
        if "prune_data" in self.methods and self.prune_importance == "finetuned_magnitude":
            retrain_epochs = self.epochs if self.prune_retrain_epochs is None else self.prune_retrain_epochs
            check_finetune_budget(self.prune_finetune_epochs, retrain_epochs)

    @property
    def methods(self) -> list[str]:
        """The method, then the baselines."""
        return [self.method, *self.baselines]

    def for_user(self, seed: int) -> PersonalisationConfig:
        """The engine's settings for one user (its own seed)."""
        engine_fields = {f.name for f in fields(PersonalisationConfig)}
        values = {name: getattr(self, name) for name in engine_fields}
        return PersonalisationConfig(**{**values, "seed": seed})


@dataclass
class InitConfig:
    """Where the exits start before personalisation, each on the same users."""

    inits: list[str] = field(default_factory=lambda: ["global"])

    def __post_init__(self):
        check_settings(
            "init",
            self,
            [
                ("inits", bool(self.inits) and set(self.inits) <= set(INITS), f"a list from {list(INITS)}"),
                ("inits", len(set(self.inits)) == len(self.inits), "a list without repeats"),
            ],
        )
        self.inits = list(self.inits)


INIT_PRESETS = {
    "global": ["global"],
    "federated": ["federated"],
    "scratch": ["scratch"],
    "compare": list(INITS),
}
# `init=compare` personalises every user three times and trains federated exits first; on a seeded
# sample of 40 held-out users it runs in under 10 minutes on 2 cores (README, "Federated exits").
# `simulation.num_users=null` compares on all of them.
COMPARE_NUM_USERS = 40


# Flower's server strategies for federated exit training (`fedexits.fl.strategy` maps each name to
# its Flower class); FedOpt's family takes a server learning rate, FedProx a proximal mu.
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")
SERVER_OPTIMISERS = ("fedadam", "fedyogi", "fedadagrad")


@dataclass
class StrategyConfig:
    """The server strategy (the command line's `federated/strategy` group). Only the settings of
    the chosen strategy may differ from their defaults, so a setting never silently does nothing."""

    name: str = "fedavg"
    server_lr: float = 1.0  # eta of fedadam / fedyogi / fedadagrad; fedavg and fedprox take the mean (1)
    proximal_mu: float = 0.0  # fedprox: mu/2 * ||w - w_round||^2 in each client's local loss
    beta_1: float = 0.9  # fedadam / fedyogi: first-moment decay
    beta_2: float = 0.99  # fedadam / fedyogi: second-moment decay
    tau: float = 1e-3  # fedadam / fedyogi / fedadagrad: adaptivity (added to the root of v)

    def __post_init__(self):
        check_settings(
            "federated.strategy",
            self,
            [
                ("name", self.name in STRATEGIES, "one of " + ", ".join(STRATEGIES)),
                ("server_lr", self.server_lr > 0, "> 0"),
                ("proximal_mu", self.proximal_mu >= 0, ">= 0"),
                ("beta_1", 0 <= self.beta_1 < 1, "in [0, 1)"),
                ("beta_2", 0 <= self.beta_2 < 1, "in [0, 1)"),
                ("tau", self.tau > 0, "> 0"),
            ],
        )
        defaults = StrategyConfig.__dataclass_fields__
        applies = {
            "server_lr": SERVER_OPTIMISERS,
            "proximal_mu": ("fedprox",),
            "beta_1": ("fedadam", "fedyogi"),
            "beta_2": ("fedadam", "fedyogi"),
            "tau": SERVER_OPTIMISERS,
        }
        for name, strategies in applies.items():
            if self.name not in strategies and getattr(self, name) != defaults[name].default:
                raise SettingsError(
                    f"federated.strategy.{name} applies to {', '.join(strategies)} only, "
                    f"not {self.name}; got {getattr(self, name)!r}"
                )


# Named strategies (`federated/strategy=NAME`): changes to StrategyConfig's defaults.
STRATEGY_PRESETS: dict[str, dict] = {
    "fedavg": {},
    "fedprox": dict(name="fedprox", proximal_mu=0.01),
    "fedadam": dict(name="fedadam", server_lr=0.01),
    "fedyogi": dict(name="fedyogi", server_lr=0.01),
    "fedadagrad": dict(name="fedadagrad", server_lr=0.01),
}


@dataclass
class FederatedConfig:
    """Federated exit training (init=federated): rounds over clients of the global population,
    each training the exits on the frozen backbone; Flower's strategy aggregates them. A seeded
    `eval_fraction` of the global users is kept out of training and evaluates the exits every
    `eval_every` rounds."""

    # The smallest budget measured within 2 pp of the centrally trained exits on the synthetic
    # default's tuning users (simulations/federated_budget.py, README "Federated exits"): 10 rounds
    # of 10 clients x 1 epoch at lr 0.01 (the earlier default) stayed 20 pp below; at 20 clients
    # x 5 epochs x lr 0.05 round 10 was 2.1 pp below and round 15 1.1 pp above.
    rounds: int = 15
    clients_per_round: int = 20
    local_epochs: int = 5
    lr: float = 0.05
    batch_size: int = 32
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    eval_fraction: float = 0.1  # of the global users, kept for federated evaluation (at least one); 0: none
    eval_every: int = 5  # rounds between federated evaluations (the last round is always evaluated)
    feature_cache_mb: float = 1024.0  # per client process: each client's frozen features, kept across rounds

    def __post_init__(self):
        check_settings(
            "federated",
            self,
            [
                ("rounds", self.rounds >= 1, "an integer >= 1"),
                ("clients_per_round", self.clients_per_round >= 1, "an integer >= 1"),
                ("local_epochs", self.local_epochs >= 1, "an integer >= 1"),
                ("lr", self.lr > 0, "> 0"),
                ("batch_size", self.batch_size >= 2, "an integer >= 2"),
                ("eval_fraction", 0 <= self.eval_fraction < 1, "in [0, 1)"),
                ("eval_every", self.eval_every >= 1, "an integer >= 1"),
                ("feature_cache_mb", self.feature_cache_mb >= 0, ">= 0"),
            ],
        )

    def eval_clients(self, num_global_users: int) -> int:
        """How many global users evaluate (and never train)."""
        if self.eval_fraction == 0 or num_global_users < 2:
            return 0
        return min(num_global_users - 1, max(1, round(self.eval_fraction * num_global_users)))

    def check_population(self, num_global_users: int) -> None:
        """Clients per round must fit the global users that train (refused, not clipped: a
        clipped budget would not be the one the report names)."""
        available = num_global_users - self.eval_clients(num_global_users)
        if self.clients_per_round > available:
            raise SettingsError(
                f"federated.clients_per_round must be <= {available} (the {num_global_users} global users "
                f"minus {num_global_users - available} evaluation clients), got {self.clients_per_round}"
            )


@dataclass
class SimulationConfig:
    """How the Flower simulation runs the users."""

    num_users: int | None = None  # held-out users personalised (a seeded sample); null = all
    client_cpus: float = (
        1.0  # CPUs per virtual client (Ray actor); Flower's default of 2 halves throughput on 2 cores
    )
    client_gpus: float = 0.0  # GPU fraction per virtual client
    ray_address: str | None = None  # join an existing Ray cluster, e.g. "auto" or "127.0.0.1:6379"
    ray_init_args: dict[str, Any] = field(default_factory=dict)  # extra ray.init arguments
    max_in_flight: int = 32  # messages pushed at once (bounds the driver's memory)
    timeout_s: float = 3600.0  # a user without a reply after this long is recorded as failed
    registration_timeout_s: float = 300.0
    profile_memory: bool = False  # peak tensor memory of each personalisation (slows it ~2x)
    save_exits: bool = False  # keep each user's exits and calibration under RUN_DIR/exits/ (for export)
    # A run with more failed users than this share (or with none ok) fails: its report is still
    # written, but its numbers describe a population other than the one asked for.
    max_failed_fraction: float = 0.1

    def __post_init__(self):
        check_settings(
            "simulation",
            self,
            [
                ("num_users", self.num_users is None or self.num_users >= 1, "an integer >= 1 (or null)"),
                ("client_cpus", self.client_cpus > 0, "> 0 (Ray cannot schedule a client with no CPU)"),
                ("client_gpus", self.client_gpus >= 0, ">= 0"),
                ("max_in_flight", self.max_in_flight >= 1, "an integer >= 1"),
                ("timeout_s", self.timeout_s > 0, "> 0 seconds"),
                ("registration_timeout_s", self.registration_timeout_s > 0, "> 0 seconds"),
                ("max_failed_fraction", 0 <= self.max_failed_fraction <= 1, "in [0, 1]"),
            ],
        )
        self.ray_init_args = dict(self.ray_init_args)


@dataclass
class StudyConfig:
    """One study: a population, a network, how it is trained, personalised, calibrated and run."""

    seed: int = 0
    cache_dir: str = "${oc.env:FEDEXITS_CACHE_DIR,'~/.cache/fedexits'}"  # data and global models
    device: str = "auto"  # auto | cpu | cuda | cuda:N (engine/device.py): training, features, evaluation
    dataset: Any = MISSING  # one of fedexits.data.config's dataclasses
    model: ModelConfig = field(default_factory=ModelConfig)
    global_training: TrainConfig = field(default_factory=TrainConfig)
    personalisation: PersonalisationSettings = field(default_factory=PersonalisationSettings)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    init: InitConfig = field(default_factory=InitConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    latency: LatencySettings = field(default_factory=LatencySettings)  # measured once per run
    mode: str = "protocol"  # protocol | lifecycle (+experiment=lifecycle; study/lifecycle.py)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)  # used in lifecycle mode

    def __post_init__(self):
        self.cache_dir = os.path.abspath(os.path.expanduser(self.cache_dir))
        if self.mode not in MODES:
            raise SettingsError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "lifecycle":  # exits only are personalised; a night needs a full batch
            if self.personalisation.method != "exits":
                raise SettingsError(
                    "personalisation.method must be exits in lifecycle mode, "
                    f"got {self.personalisation.method!r}"
                )
            check_buffer(self.lifecycle, self.personalisation)
        check_device_name(self.device)
        self.dataset = parse_config(self.dataset)
        p = self.personalisation
        if "exits" in p.methods:  # a loss that is zero for every user fails the run, not each user
            try:
                p.loss_weights().check_active(int(p.label_fraction > 0), int(p.label_fraction < 1))
            except UserDataError:
                raise SettingsError(
                    f"personalisation loss is zero for every sample at label_fraction={p.label_fraction}: "
                    f"alpha={p.alpha} weighs labelled samples, gamma={p.gamma} unlabelled ones, "
                    f"beta={p.beta} all"
                ) from None
        pruning = set(p.methods) & set(PRUNING_METHODS)
        if pruning and self.model.backbone not in PRUNABLE_BACKBONES:
            raise SettingsError(
                f"model.backbone {self.model.backbone!r} cannot be pruned ({sorted(pruning)[0]}): the "
                "pruner is verified here only for " + ", ".join(PRUNABLE_BACKBONES)
            )
        if pruning and p.label_fraction == 0 and not p.prune_pseudo_labels:
            raise SettingsError(
                f"{sorted(pruning)[0]} has nothing to retrain on: personalisation.label_fraction=0 and "
                "personalisation.prune_pseudo_labels=false"
            )


def register_configs() -> None:
    """Put every section and named option into Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="study_schema", node=StudyConfig)
    for source, config_class in CONFIG_CLASSES.items():
        store.store(group="dataset", name=source, node=config_class)
    for name, preset in MODEL_PRESETS.items():
        store.store(group="model", name=name, node=ModelConfig(**preset))
    for name, preset in TRAIN_PRESETS.items():
        store.store(group="global_training", name=name, node=TrainConfig(**preset))
    for name, preset in PRESETS.items():
        store.store(group="personalisation", name=name, node=PersonalisationSettings(**preset))
    for name, preset in CALIBRATION_PRESETS.items():
        store.store(group="calibration", name=name, node=CalibrationConfig(**preset))
    for name, inits in INIT_PRESETS.items():
        if name == "compare":  # also sets the user sample: the option writes at the top level
            node = {"init": {"inits": inits}, "simulation": {"num_users": COMPARE_NUM_USERS}}
            store.store(group="init", name=name, node=node, package="_global_")
        else:
            store.store(group="init", name=name, node=InitConfig(inits=inits))
    for name, preset in STRATEGY_PRESETS.items():
        store.store(group="federated/strategy", name=name, node=StrategyConfig(**preset))
    store.store(group="simulation", name="default", node=SimulationConfig)


def to_study_config(cfg: DictConfig) -> StudyConfig:
    """A composed Hydra config as the validated dataclass (SettingsError, one line, if not)."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        raise SettingsError(config_error_line(error)) from None


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """The command line's settings for `overrides`, without running the Hydra app (notebooks,
    `flwr run`, scripts)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    register_configs()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise SettingsError(hydra_error_line(error)) from None
    return to_study_config(cfg)


def hydra_error_line(error: Exception) -> str:
    """One line for a Hydra composition error: the key and what its value should be, or the
    missing option and the available ones."""
    if isinstance(error.__cause__, OmegaConfBaseException):
        return config_error_line(error.__cause__)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    missing = re.search(r"Could not find '([^']+)/([^']+)'", lines[0]) if lines else None
    if missing:
        group, option = missing.groups()
        available = []
        for line in lines[1:]:
            if line.startswith("Config search path"):
                break
            if not line.startswith("Available"):
                available.append(line)
        return f"{group}={option}: no such option; available: {', '.join(available) or 'none'}"
    return config_error_line(error)


def settings_to_dict(settings: StudyConfig) -> dict:
    """Plain, JSON-able data (what travels to Flower clients)."""
    return OmegaConf.to_container(OmegaConf.structured(settings), resolve=True)


def settings_from_dict(data: dict) -> StudyConfig:
    """The inverse of `settings_to_dict`, validated again."""
    node = OmegaConf.merge(
        OmegaConf.structured(StudyConfig), {k: v for k, v in data.items() if k != "dataset"}
    )
    node.dataset = data["dataset"]
    return to_study_config(node)
