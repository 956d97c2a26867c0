"""Channel pruning through torch-pruning's dependency graph: importance scores measured once on
an unpruned network, removal of the lowest-scored channels, and the share of channels that
removes a requested share of FLOPs (measured with torch's flop counter).

Every prunable group (a layer's output channels together with everything coupled to them:
BatchNorm, the next layer's inputs, residual additions, depthwise convolutions) loses the same
share of its channels ("local" pruning), so the pruned architecture depends on that share only.
The final linear layer keeps its outputs (the classes).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from ..errors import SettingsError
from ..models.costs import count_flops, module_device
from .personalise import batch_bounds

FLOPS_TOLERANCE = 0.1  # measured FLOPs within 10% of the requested FLOPs
SEARCH_TOLERANCE = 0.02  # the search for the share of channels stops within 2%
_RATIO_CACHE: dict[tuple[str, float], float] = {}  # (architecture, level) -> share of channels


class _FixedImportance(tp.importance.Importance):
    """Scores measured once on the unpruned network, served by the name of each group's root
    layer: pruning a fresh copy at another level reuses them (valid because pruning is one-shot,
    from the same unpruned network)."""

    def __init__(self, scores: dict[str, torch.Tensor], network: nn.Module):
        self.scores = scores
        self.names = {module: name for name, module in network.named_modules()}

    def __call__(self, group) -> torch.Tensor:
        return self.scores[self.names[group[0].dep.target.module]].clone()


def _pruner(network, input_shape, importance, ratio: float = 0.0) -> tp.pruner.MetaPruner:
    """Local pruning: every layer loses the same share of its channels; the classifier's outputs
    (the classes) are kept."""
    network.eval()  # tracing runs a forward pass: BatchNorm statistics must not move
    last_linear = [m for m in network.modules() if isinstance(m, nn.Linear)][-1]
    example = torch.zeros(1, *input_shape, device=module_device(network))
    return tp.pruner.MetaPruner(
        network, example, importance=importance, pruning_ratio=ratio, ignored_layers=[last_linear]
    )


def channel_scores(network, input_shape, importance) -> dict[str, torch.Tensor]:
    """Importance of every channel of every prunable group, keyed by the group's root layer."""
    pruner = _pruner(network, input_shape, importance)
    names = {module: name for name, module in network.named_modules()}
    groups = pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    )
    scores = {}
    for group in groups:
        score = importance(group)
        if score is not None:
            scores[names[group[0].dep.target.module]] = score.detach().clone()
    return scores


def taylor_scores(network, input_shape, x, targets, batch_size: int) -> dict[str, torch.Tensor]:
    """Gradients of the user's summed loss (BatchNorm statistics frozen), then |w * dL/dw|."""
    network.eval().zero_grad(set_to_none=True)
    for start, end in batch_bounds(len(x), batch_size):
        F.cross_entropy(network(x[start:end]), targets[start:end], reduction="sum").backward()
    scores = channel_scores(network, input_shape, tp.importance.GroupTaylorImportance(normalizer=None))
    network.zero_grad(set_to_none=True)
    return scores


def magnitude_scores(network, input_shape) -> dict[str, torch.Tensor]:
    return channel_scores(network, input_shape, tp.importance.MagnitudeImportance(p=1, normalizer=None))


def prune_channels(network, input_shape, scores, ratio: float) -> dict[str, list[int]]:
    """Remove `ratio` of every layer's channels (the lowest-scored), in place; returns what went."""
    pruner = _pruner(network, input_shape, _FixedImportance(scores, network), ratio)
    pruner.step()
    network.to(memory_format=torch.channels_last)
    return {name: sorted(int(i) for i in idxs) for name, is_out, idxs in pruner.pruning_history() if is_out}


def flops_of(network, input_shape) -> int:
    return count_flops(network.eval(), torch.zeros(1, *input_shape, device=module_device(network)))[0]


def channel_ratio_for(network, input_shape, fraction: float, key: str) -> float:
    """The share of channels to remove from every layer so that the measured FLOPs fall within
    2% of (1 - fraction) of the unpruned network's. It depends on the architecture only (not
    on weights or scores), so it is searched once per `key` (the architecture) and level."""
    if (key, fraction) in _RATIO_CACHE:
        return _RATIO_CACHE[(key, fraction)]
    scores = magnitude_scores(network, input_shape)
    full = flops_of(network, input_shape)
    target = (1 - fraction) * full

    def flops_at(ratio: float) -> int:
        pruned = copy.deepcopy(network)
        prune_channels(pruned, input_shape, scores, ratio)
        return flops_of(pruned, input_shape)

    narrowest = min(scores, key=lambda name: len(scores[name]))
    highest = 1 - 1 / len(scores[narrowest]) - 1e-9  # every layer keeps at least one channel
    lowest_flops = flops_at(highest)
    if lowest_flops > (1 + FLOPS_TOLERANCE) * target:
        raise SettingsError(
            f"pruning.prune_flops_fraction={fraction} would remove every channel of layer {narrowest!r} "
            f"({len(scores[narrowest])} channels); this network allows at most {1 - lowest_flops / full:.2f}"
        )
    low, high, ratio = 0.0, highest, min(highest, 1 - math.sqrt(1 - fraction))  # FLOPs ~ (1 - ratio)^2
    best = (lowest_flops, highest)
    for _ in range(20):
        measured = flops_at(ratio)
        best = min(best, (measured, ratio), key=lambda m: abs(m[0] - target))
        if abs(measured - target) <= SEARCH_TOLERANCE * target:
            break
        low, high = (ratio, high) if measured > target else (low, ratio)
        ratio = (low + high) / 2
    _RATIO_CACHE[(key, fraction)] = best[1]
    return best[1]
