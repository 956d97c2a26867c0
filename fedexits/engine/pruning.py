"""Structured pruning + retraining for one user: the other on-device way to personalise.

Rajagopal & Bouganis, "Now that I can see, I can improve: Enabling data-driven finetuning of CNNs
on the edge", CVPR workshops 2020 (arXiv 2006.08554): remove whole channels of the shared CNN
using the user's own data, then retrain the smaller network on that data. Two methods:

- `prune_data`: channel importance measured on the user's data. `prune_importance="taylor"` (default)
  is the first-order Taylor estimate of how much the user's loss changes when a channel goes,
  |w * dL/dw| summed over the channel's dependency group (Molchanov et al., CVPR 2019,
  torch-pruning's `GroupTaylorImportance`), from one gradient pass over the user's images.
  `prune_importance="finetuned_magnitude"` is the seed paper's own procedure (its ADaPT code): fine-tune
  the whole network on the user's data for `prune_finetune_epochs`, then rank filters by L1 norm; the
  fine-tuning epochs come out of the retraining budget, so both methods train equally long.
- `prune_agnostic`: filter L1 norm of the shared weights (Li et al., ICLR 2017), the seed paper's
  data-agnostic ranking; the data is used only for retraining. (The seed's agnostic arm also
  retrained on the whole data set instead of the user's; here both retrain on the user's data,
  so the comparison isolates which channels are kept.)

Both prune the backbone and the final classifier (the exits are not used and are dropped) of a
deep copy, through torch-pruning's dependency graph (residual and depthwise couplings included),
with the same share of channels removed from every layer (kept channels rounded to a multiple of
`prune_round_to`, 8 by default: see `channel_pruning`): the architecture, hence the FLOPs, of a
level is the same for both methods and every user, only *which* channels survive differs. That
share is searched once per architecture and level so that the flop counter's measurement lands
within 10% of the requested FLOPs. Retraining uses labels where labelled and the unpruned final
exit's top-1 elsewhere. BatchNorm trains in training mode and its running statistics are then
re-estimated on the user's data: removing a layer's input channels invalidates the statistics of
the BatchNorm after it (the `full` baseline, which removes nothing, keeps them frozen instead).
The shared model is never modified, and the fail-safe is gone: the user's network is
the retrained one, with no shared final classifier to fall back on.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SettingsError, UserDataError, check_settings
from ..models.costs import count_params, module_device
from .channel_pruning import (
    FLOPS_TOLERANCE,
    ROUND_TO,
    ChannelShare,
    channel_share_for,
    flops_of,
    magnitude_scores,
    prune_channels,
    taylor_scores,
)
from .latency import LatencySettings, network_latency_ms
from .personalise import (
    PersonalisationConfig,
    PersonalisationResult,
    batch_bounds,
    check_user_data,
    make_optimizer,
)

PRUNABLE_BACKBONES = ("femnist_mobilenet_v2", "mobilenet_v2", "resnet18", "resnet34", "resnet50")
IMPORTANCES = ("taylor", "finetuned_magnitude")


PRUNE_LEVELS = (0.25, 0.5, 0.75)  # the sweep of shares of FLOPs removed (a per-user curve)


@dataclass
class PruningConfig:
    """How `prune_data` / `prune_agnostic` prune and retrain. Retraining otherwise follows the
    personalisation settings (optimiser, momentum, weight decay, seed); None = the same value.
    The names are the command line's (`personalisation.prune_*`): the study's personalisation
    settings inherit these fields, so a notebook and the command line share every default."""

    prune_flops_fraction: float = 0.5  # share of the network's FLOPs removed
    prune_levels: list[float] = field(default_factory=lambda: list(PRUNE_LEVELS))  # prune_sweep's
    prune_importance: str = "taylor"  # prune_data's criterion: "taylor" or "finetuned_magnitude"
    prune_finetune_epochs: int = 3  # prune_importance="finetuned_magnitude": epochs before pruning
    prune_retrain_epochs: int | None = None  # None: personalisation.epochs
    prune_retrain_lr: float | None = None  # None: personalisation.lr
    prune_retrain_batch_size: int | None = None  # None: personalisation.batch_size
    prune_pseudo_labels: bool = True  # unlabelled images train on the unpruned final exit's top-1
    prune_round_to: int = ROUND_TO  # kept channels per layer: a multiple of this (1: exact shares)

    def __post_init__(self):
        self.prune_levels = levels = [float(level) for level in self.prune_levels]

        def none_or(value, ok) -> bool:
            return value is None or ok(value)

        importances = " or ".join(map(repr, IMPORTANCES))

        check_settings(
            "personalisation",
            self,
            [
                ("prune_flops_fraction", 0 < self.prune_flops_fraction < 1, "in (0, 1)"),
                ("prune_levels", all(0 < level < 1 for level in levels), "a list of shares in (0, 1)"),
                ("prune_levels", len(set(levels)) == len(levels), "a list without repeats"),
                ("prune_importance", self.prune_importance in IMPORTANCES, importances),
                ("prune_finetune_epochs", self.prune_finetune_epochs >= 1, "an integer >= 1"),
                ("prune_round_to", self.prune_round_to >= 1, "an integer >= 1"),
                ("prune_retrain_epochs", none_or(self.prune_retrain_epochs, lambda v: v >= 0),
                 "None or >= 0"),
                ("prune_retrain_lr", none_or(self.prune_retrain_lr, lambda v: v > 0), "None or > 0"),
                ("prune_retrain_batch_size", none_or(self.prune_retrain_batch_size, lambda v: v >= 2),
                 "None or >= 2"),
            ],
        )  # fmt: skip

    @property
    def pruned_levels(self) -> list[float]:
        """Every level a run prunes at: `prune_flops_fraction` (the user's network), then the
        sweep's other levels (the user's accuracy/cost curve)."""
        rest = [level for level in self.prune_levels if level != self.prune_flops_fraction]
        return [self.prune_flops_fraction, *rest]

    def pruning_config(self) -> PruningConfig:
        """Just the pruning fields (from a subclass that adds others, e.g. the study's settings)."""
        return PruningConfig(**{f.name: getattr(self, f.name) for f in fields(PruningConfig)})

    def retraining(self, personalisation: PersonalisationConfig) -> PersonalisationConfig:
        overrides = dict(
            epochs=self.prune_retrain_epochs,
            lr=self.prune_retrain_lr,
            batch_size=self.prune_retrain_batch_size,
        )
        engine = {f.name: getattr(personalisation, f.name) for f in fields(PersonalisationConfig)}
        return PersonalisationConfig(**{**engine, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class PruningResult(PersonalisationResult):
    """A personalisation result plus the user's pruned network (`network`, returns final logits)
    and what it costs. `seconds` = importance_s + prune_s + retrain_s."""

    network: nn.Module | None = field(default=None, repr=False, compare=False)
    importance: str = ""
    prune_flops_fraction: float = 0.0  # requested
    flops_removed: float = 0.0  # measured: 1 - mflops / mflops_unpruned
    channel_ratio: float = 0.0  # share of the prunable layers' channels removed (all layers together)
    mflops: float = 0.0
    mflops_unpruned: float = 0.0
    params: int = 0
    params_unpruned: int = 0
    n_pseudo: int = 0  # samples trained on with a pseudo-label
    importance_s: float = 0.0  # pseudo-labels, (fine-tuning), importance
    prune_s: float = 0.0
    retrain_s: float = 0.0
    pruned_channels: dict[str, list[int]] = field(default_factory=dict)  # root layer -> removed

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(replace(self, network=None)).items() if k != "network"}


def final_network(model) -> nn.Sequential:
    """A trainable copy of the model's blocks and final classifier (no exits), in eval mode."""
    network = nn.Sequential(*copy.deepcopy(list(model.blocks)), copy.deepcopy(model.classifier))
    return network.requires_grad_(True).eval()


def check_prunable(model) -> None:
    """SettingsError unless the pruner is verified for the model's backbone."""
    spec = getattr(model, "spec", None)
    backbone = spec.backbone if spec is not None else f"{type(model).__name__} without a spec"
    if backbone not in PRUNABLE_BACKBONES:
        raise SettingsError(
            f"backbone {backbone!r} cannot be pruned: the pruner is verified here only for "
            + ", ".join(PRUNABLE_BACKBONES)
        )


def channel_shares(model, levels: Sequence[float], round_to: int = ROUND_TO) -> dict[float, ChannelShare]:
    """For each level (share of FLOPs removed), the shares of the layers' channels that remove
    it (kept channels a multiple of `round_to`), checked against the flop counter (within 10%).
    Depends on the architecture only, so a run computes it once, before any user, and refuses an
    unreachable level there (one line)."""
    check_prunable(model)
    network, shape = final_network(model), tuple(model.input_shape)
    full, key = flops_of(network, shape), _architecture_key(model)
    scores = magnitude_scores(network, shape)  # any scores: the architecture does not depend on them
    shares = {}
    for level in levels:
        shares[float(level)] = share = channel_share_for(network, shape, float(level), key, round_to)
        pruned = copy.deepcopy(network)
        prune_channels(pruned, shape, scores, share, round_to)
        _check_level(level, flops_of(pruned, shape), full)
    return shares


def _check_level(level: float, flops: int, full_flops: int) -> None:
    target = (1 - level) * full_flops
    if abs(flops - target) > FLOPS_TOLERANCE * target:
        raise SettingsError(
            f"prune level {level} (personalisation.prune_flops_fraction or prune_levels) cannot be "
            f"reached within 10% on this network (closest: {1 - flops / full_flops:.3f} of the FLOPs removed)"
        )


@torch.no_grad()
def predict(network: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    network.eval()
    device = module_device(network)
    return torch.cat([network(x[s : s + batch_size].to(device)) for s in range(0, len(x), batch_size)])


def _training_set(network, x, y, labelled, pseudo_labels: bool):
    """Images and targets to retrain on: labels where labelled, else the unpruned final exit's
    top-1 (computed here, before anything changes the network)."""
    if not pseudo_labels:
        return x[labelled], y[labelled], 0
    targets = torch.where(labelled, y, predict(network, x).argmax(1))
    return x, targets, int((~labelled).sum())


def _train(network, x, targets, config: PersonalisationConfig, epochs: int) -> list[float]:
    """Cross-entropy, the personalisation optimiser and batches; BatchNorm in training mode.
    Batch order and dropout are seeded by `config.seed` alone, so a level of a sweep trains
    exactly as a single prune at that level."""
    optimizer = make_optimizer(network.parameters(), config)
    bounds = batch_bounds(len(x), config.batch_size)
    losses = []
    with torch.random.fork_rng():  # dropout draws from the global generator
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        for _ in range(epochs):
            network.train()
            order, total = torch.randperm(len(x), generator=generator), 0.0
            for start, end in bounds:
                idx = order[start:end]
                loss = F.cross_entropy(network(x[idx]), targets[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
            losses.append(total / len(bounds))
    network.eval()
    return losses


@torch.no_grad()
def recalibrate_batchnorm(network, x: torch.Tensor, batch_size: int) -> None:
    """BatchNorm running statistics re-estimated on `x` (an exact average over its batches) for
    the network's final weights. Pruning leaves them stale (a BatchNorm whose preceding layer lost
    input channels sees another distribution), and a few retraining steps at momentum 0.1 do not
    wash that out: without this, a pruned and retrained network can fall to chance accuracy."""
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    network.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum, norm.training = None, True  # None: cumulative average
    for start, end in batch_bounds(len(x), batch_size):
        network(x[start:end])
    for norm, momentum in zip(norms, momenta):
        norm.momentum, norm.training = momentum, False


def _architecture_key(model) -> str:
    return json.dumps(model.spec.architecture(), sort_keys=True)


def prune_sweep(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    labelled: torch.Tensor | None = None,
    config: PersonalisationConfig | None = None,
    pruning: PruningConfig | None = None,
    method: str = "prune_data",
    levels: Sequence[float] | None = None,
    shares: dict[float, ChannelShare] | None = None,
) -> list[PruningResult]:
    """Prune and retrain one user's copy of `model` at each level (share of FLOPs removed;
    default `pruning.prune_levels`). Pseudo-labels and channel importance are computed once, on
    the unpruned network, and reused by every level; each level then prunes its own copy and
    retrains it. `shares`: `channel_shares(model, levels, pruning.prune_round_to)` computed
    beforehand (else searched here, once per process and architecture)."""
    if method not in PRUNING_METHODS:
        raise SettingsError(f"pruning method must be one of {sorted(PRUNING_METHODS)}, got {method!r}")
    config, pruning = config or PersonalisationConfig(), pruning or PruningConfig()
    levels = list(pruning.prune_levels if levels is None else levels)
    replace(pruning, prune_levels=levels)  # validates the levels
    levels, shares = [float(level) for level in levels], dict(shares or {})
    round_to = pruning.prune_round_to
    check_prunable(model)
    if x.ndim == 4 and len(x) == 0:
        raise UserDataError("user has no personalisation images to measure importance on or retrain with")
    labelled = check_user_data(model, x, y, labelled)
    if not pruning.prune_pseudo_labels and not labelled.any():
        raise UserDataError("user has no labelled images and personalisation.prune_pseudo_labels is off")
    retrain = pruning.retraining(config)
    n_train = len(x) if pruning.prune_pseudo_labels else int(labelled.sum())
    if n_train < 2:
        raise UserDataError(f"user has {n_train} image(s) to retrain on; BatchNorm needs at least 2")
    importance = pruning.prune_importance if method == "prune_data" else "magnitude"
    epochs = retrain.epochs
    if importance == "finetuned_magnitude":
        check_finetune_budget(pruning.prune_finetune_epochs, epochs)
        epochs -= pruning.prune_finetune_epochs
    shape = tuple(model.input_shape)

    started = time.perf_counter()
    unpruned = final_network(model)
    x_train, targets, n_pseudo = _training_set(unpruned, x, y, labelled, pruning.prune_pseudo_labels)
    if importance == "taylor":
        scores = taylor_scores(unpruned, shape, x_train, targets, retrain.batch_size)
    else:
        if importance == "finetuned_magnitude":
            _train(unpruned, x_train, targets, retrain, pruning.prune_finetune_epochs)
        scores = magnitude_scores(unpruned, shape)
    importance_s = time.perf_counter() - started
    full_flops, full_params = flops_of(unpruned, shape), count_params(unpruned)

    results = []
    for level in levels:
        started = time.perf_counter()
        share = shares.get(level)
        if share is None:
            share = channel_share_for(unpruned, shape, level, _architecture_key(model), round_to)
        network = copy.deepcopy(unpruned)
        removed = prune_channels(network, shape, scores, share, round_to)
        flops = flops_of(network, shape)
        _check_level(level, flops, full_flops)
        prune_s = time.perf_counter() - started
        started = time.perf_counter()
        losses = _train(network, x_train, targets, retrain, epochs)
        recalibrate_batchnorm(network, x_train, retrain.batch_size)
        retrain_s = time.perf_counter() - started
        results.append(
            PruningResult(
                method=method,
                seconds=importance_s + prune_s + retrain_s,
                n_train=len(x_train),
                n_val=0,
                epoch_losses=losses,
                network=network,
                importance=importance,
                prune_flops_fraction=level,
                flops_removed=1 - flops / full_flops,
                channel_ratio=sum(map(len, removed.values())) / sum(map(len, scores.values())),
                mflops=flops / 1e6,
                mflops_unpruned=full_flops / 1e6,
                params=count_params(network),
                params_unpruned=full_params,
                n_pseudo=n_pseudo,
                importance_s=importance_s,
                prune_s=prune_s,
                retrain_s=retrain_s,
                pruned_channels=removed,
            )
        )
    return results


def check_finetune_budget(finetune_epochs: int, retrain_epochs: int) -> None:
    if finetune_epochs > retrain_epochs:
        raise SettingsError(
            f"personalisation.prune_finetune_epochs ({finetune_epochs}) must not exceed the "
            f"retraining epochs ({retrain_epochs}): they are part of that budget"
        )


def prune_data(model, x, y, labelled=None, config=None, pruning=None, **overrides) -> PruningResult:
    """Data-aware pruning + retraining of a copy of `model` for one user (see module docstring);
    `overrides` change the personalisation config, as for the other methods."""
    config = replace(config or PersonalisationConfig(), **overrides)
    pruning = pruning or PruningConfig()
    levels = (pruning.prune_flops_fraction,)
    return prune_sweep(model, x, y, labelled, config, pruning, "prune_data", levels)[0]


def prune_agnostic(model, x, y, labelled=None, config=None, pruning=None, **overrides) -> PruningResult:
    """Data-agnostic (filter L1 norm) pruning of a copy of `model`, retrained on the user's data."""
    config = replace(config or PersonalisationConfig(), **overrides)
    pruning = pruning or PruningConfig()
    levels = (pruning.prune_flops_fraction,)
    return prune_sweep(model, x, y, labelled, config, pruning, "prune_agnostic", levels)[0]


# Methods that return a new network (PruningResult.network) instead of changing the model.
PRUNING_METHODS = {"prune_data": prune_data, "prune_agnostic": prune_agnostic}


@torch.no_grad()
def evaluate_networks(
    networks: Sequence[nn.Module],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    reference: nn.Module | None = None,
    latency: LatencySettings | None = None,
) -> list[dict]:
    """Test accuracy, measured MFLOPs, parameters and batch-1 latency of pruned networks, as a
    device runs them (`latency`: the run's runtime, ONNX Runtime by default, BatchNorm folded).
    With `reference` (the unpruned network, `final_network(model)`), all are timed round-robin
    with it and the ratios are given: `latency_speedup` places a network on a latency profile
    measured at another time (the run's), whatever else the machine is doing now."""
    shape = tuple(x_test.shape[1:])
    timed = list(networks) + ([reference] if reference is not None else [])
    latencies = network_latency_ms(timed, shape, latency)
    out = []
    for network, latency_ms in zip(networks, latencies):
        accuracy = (predict(network, x_test).argmax(1).cpu() == y_test.cpu()).double().mean().item()
        mflops = flops_of(network, shape) / 1e6
        row = dict(accuracy=accuracy, mflops=mflops, params=count_params(network), latency_ms=latency_ms)
        if reference is not None:
            row["reference_mflops"] = flops_of(reference, shape) / 1e6
            row["reference_latency_ms"] = latencies[-1]
            row["flops_speedup"] = row["reference_mflops"] / mflops
            row["latency_speedup"] = latencies[-1] / latency_ms
        out.append(row)
    return out


def evaluate_pruned(network, x_test, y_test, reference=None, latency=None, **latency_overrides) -> dict:
    """`evaluate_networks` for one network; `latency_overrides` change `LatencySettings` (e.g.
    repeats=5, runtime="eager")."""
    latency = replace(latency or LatencySettings(), **latency_overrides)
    return evaluate_networks([network], x_test, y_test, reference, latency)[0]
