"""Structured pruning + retraining for one user: the other on-device way to personalise.

Rajagopal & Bouganis, "Now that I can see, I can improve: Enabling data-driven finetuning of CNNs
on the edge", CVPR workshops 2020 (arXiv 2006.08554): remove whole channels of the shared CNN
using the user's own data, then retrain the smaller network on that data. Two methods:

- `prune_data`: channel importance measured on the user's data. `importance="taylor"` (default)
  is the first-order Taylor estimate of how much the user's loss changes when a channel goes,
  |w * dL/dw| summed over the channel's dependency group (Molchanov et al., CVPR 2019,
  torch-pruning's `GroupTaylorImportance`), from one gradient pass over the user's images.
  `importance="finetuned_magnitude"` is the seed paper's own procedure (its ADaPT code): fine-tune
  the whole network on the user's data for `finetune_epochs`, then rank filters by L1 norm; the
  fine-tuning epochs come out of the retraining budget, so both methods train equally long.
- `prune_agnostic`: filter L1 norm of the shared weights (Li et al., ICLR 2017), the seed paper's
  data-agnostic ranking; the data is used only for retraining. (The seed's agnostic arm also
  retrained on the whole data set instead of the user's; here both retrain on the user's data,
  so the comparison isolates which channels are kept.)

Both prune the backbone and the final classifier (the exits are not used and are dropped) of a
deep copy, through torch-pruning's dependency graph (residual and depthwise couplings included),
with the same share of channels removed from every layer: the architecture, hence the FLOPs, of a
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
import functools
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SettingsError, UserDataError
from ..models.costs import count_params, module_device
from .channel_pruning import (
    FLOPS_TOLERANCE,
    channel_ratio_for,
    flops_of,
    magnitude_scores,
    prune_channels,
    taylor_scores,
)
from .personalise import (
    PersonalisationConfig,
    PersonalisationResult,
    batch_bounds,
    check_user_data,
    make_optimizer,
)
from .profiling import interleaved_medians_ms

PRUNABLE_BACKBONES = ("femnist_mobilenet_v2", "mobilenet_v2", "resnet18", "resnet34", "resnet50")
IMPORTANCES = ("taylor", "finetuned_magnitude")


@dataclass(frozen=True)
class PruningConfig:
    """How `prune_data` / `prune_agnostic` prune and retrain. Retraining otherwise follows the
    personalisation settings (optimiser, momentum, weight decay, seed); None = the same value."""

    prune_flops_fraction: float = 0.5  # share of the network's FLOPs removed
    importance: str = "taylor"  # prune_data's criterion: "taylor" or "finetuned_magnitude"
    finetune_epochs: int = 3  # importance="finetuned_magnitude": epochs before pruning
    retrain_epochs: int | None = None  # None: personalisation.epochs
    retrain_lr: float | None = None  # None: personalisation.lr
    retrain_batch_size: int | None = None  # None: personalisation.batch_size
    pseudo_labels: bool = True  # unlabelled images train on the unpruned final exit's top-1

    def __post_init__(self):
        checks = [
            ("prune_flops_fraction", 0 < self.prune_flops_fraction < 1, "in (0, 1)"),
            ("importance", self.importance in IMPORTANCES, " or ".join(map(repr, IMPORTANCES))),
            ("finetune_epochs", self.finetune_epochs >= 1, "an integer >= 1"),
            ("retrain_epochs", self.retrain_epochs is None or self.retrain_epochs >= 0, "None or >= 0"),
            ("retrain_lr", self.retrain_lr is None or self.retrain_lr > 0, "None or > 0"),
            ("retrain_batch_size", self.retrain_batch_size is None or self.retrain_batch_size >= 2,
             "None or >= 2"),
        ]  # fmt: skip
        for name, ok, expected in checks:
            if not ok:
                raise SettingsError(f"pruning.{name} must be {expected}, got {getattr(self, name)!r}")

    def retraining(self, personalisation: PersonalisationConfig) -> PersonalisationConfig:
        overrides = dict(epochs=self.retrain_epochs, lr=self.retrain_lr, batch_size=self.retrain_batch_size)
        return replace(personalisation, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class PruningResult(PersonalisationResult):
    """A personalisation result plus the user's pruned network (`network`, returns final logits)
    and what it costs. `seconds` = importance_s + prune_s + retrain_s."""

    network: nn.Module | None = field(default=None, repr=False, compare=False)
    importance: str = ""
    prune_flops_fraction: float = 0.0  # requested
    flops_removed: float = 0.0  # measured: 1 - mflops / mflops_unpruned
    channel_ratio: float = 0.0  # share of every layer's channels removed
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


def _check_prunable(model) -> None:
    spec = getattr(model, "spec", None)
    backbone = spec.backbone if spec is not None else f"{type(model).__name__} without a spec"
    if backbone not in PRUNABLE_BACKBONES:
        raise SettingsError(
            f"backbone {backbone!r} cannot be pruned: the pruner is verified here only for "
            + ", ".join(PRUNABLE_BACKBONES)
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
    levels: Sequence[float] = (0.25, 0.5, 0.75),
) -> list[PruningResult]:
    """Prune and retrain one user's copy of `model` at each level (share of FLOPs removed).
    Pseudo-labels and channel importance are computed once, on the unpruned network, and reused
    by every level; each level then prunes its own copy and retrains it."""
    if method not in PRUNING_METHODS:
        raise SettingsError(f"pruning method must be one of {sorted(PRUNING_METHODS)}, got {method!r}")
    config, pruning = config or PersonalisationConfig(), pruning or PruningConfig()
    levels = [float(level) for level in levels]
    for level in levels:
        replace(pruning, prune_flops_fraction=level)  # validates the level
    _check_prunable(model)
    if x.ndim == 4 and len(x) == 0:
        raise UserDataError("user has no personalisation images to measure importance on or retrain with")
    labelled = check_user_data(model, x, y, labelled)
    if not pruning.pseudo_labels and not labelled.any():
        raise UserDataError("user has no labelled images and pruning.pseudo_labels is off")
    retrain = pruning.retraining(config)
    n_train = len(x) if pruning.pseudo_labels else int(labelled.sum())
    if n_train < 2:
        raise UserDataError(f"user has {n_train} image(s) to retrain on; BatchNorm needs at least 2")
    importance = pruning.importance if method == "prune_data" else "magnitude"
    epochs = retrain.epochs
    if importance == "finetuned_magnitude":
        if pruning.finetune_epochs > epochs:
            raise SettingsError(
                f"pruning.finetune_epochs ({pruning.finetune_epochs}) must not exceed the "
                f"retraining epochs ({epochs}): they are part of that budget"
            )
        epochs -= pruning.finetune_epochs
    shape = tuple(model.input_shape)

    started = time.perf_counter()
    unpruned = final_network(model)
    x_train, targets, n_pseudo = _training_set(unpruned, x, y, labelled, pruning.pseudo_labels)
    if importance == "taylor":
        scores = taylor_scores(unpruned, shape, x_train, targets, retrain.batch_size)
    else:
        if importance == "finetuned_magnitude":
            _train(unpruned, x_train, targets, retrain, pruning.finetune_epochs)
        scores = magnitude_scores(unpruned, shape)
    importance_s = time.perf_counter() - started
    full_flops, full_params = flops_of(unpruned, shape), count_params(unpruned)

    results = []
    for level in levels:
        started = time.perf_counter()
        ratio = channel_ratio_for(unpruned, shape, level, _architecture_key(model))
        network = copy.deepcopy(unpruned)
        removed = prune_channels(network, shape, scores, ratio)
        flops = flops_of(network, shape)
        target = (1 - level) * full_flops
        if abs(flops - target) > FLOPS_TOLERANCE * target:
            raise SettingsError(
                f"pruning.prune_flops_fraction={level} cannot be reached within 10% on this network "
                f"(closest: {1 - flops / full_flops:.3f} of the FLOPs removed)"
            )
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
                channel_ratio=ratio,
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
def evaluate_pruned(
    network: nn.Module,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    reference: nn.Module | None = None,
    latency_repeats: int = 20,
) -> dict:
    """Test accuracy, measured MFLOPs, parameters and batch-1 latency of a pruned network, as a
    device runs it (BatchNorm folded, like `fold_batchnorm`). With `reference` (the unpruned
    network, `final_network(model)`), both are timed round-robin and the ratios are given: use
    `latency_speedup` to place the network on the run's latency profile."""
    from torch.fx.experimental.optimization import fuse

    shape = tuple(x_test.shape[1:])
    accuracy = (predict(network, x_test).argmax(1).cpu() == y_test.cpu()).double().mean().item()
    out = dict(accuracy=accuracy, mflops=flops_of(network, shape) / 1e6, params=count_params(network))
    sample = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).to(module_device(network))
    networks = [network] + ([reference.eval()] if reference is not None else [])
    runs = [functools.partial(fuse(n), sample) for n in networks]
    latencies = interleaved_medians_ms(runs, repeats=latency_repeats)
    out["latency_ms"] = latencies[0]
    if reference is not None:
        out["reference_mflops"] = flops_of(reference, shape) / 1e6
        out["reference_latency_ms"] = latencies[1]
        out["flops_speedup"] = out["reference_mflops"] / out["mflops"]
        out["latency_speedup"] = latencies[1] / latencies[0]
    return out
