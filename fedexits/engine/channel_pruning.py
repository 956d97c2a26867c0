"""Channel pruning through torch-pruning's dependency graph: importance scores measured once on
an unpruned network, removal of the lowest-scored channels, and the share of channels that
removes a requested share of FLOPs (measured with torch's flop counter).

Every prunable group (a layer's output channels together with everything coupled to them:
BatchNorm, the next layer's inputs, residual additions, depthwise convolutions) loses the same
share of its channels ("local" pruning), so the pruned architecture depends on that share only.
The final linear layer keeps its outputs (the classes). With `round_to` (default 8), a layer
keeps a multiple of that many channels: ONNX Runtime's CPU convolutions work on blocks of 8
channels, and odd counts made the pruned 28x28 MobileNetV2 slower than the unpruned one there
(0.71 -> 1.74 ms at batch 1 with 25% of the FLOPs removed; 0.64 -> 0.58 ms rounded to 8).
Layers with no more than `round_to` channels are not pruned.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from ..errors import SettingsError
from ..models.costs import count_flops, module_device
from .personalise import batch_bounds

FLOPS_TOLERANCE = 0.1  # measured FLOPs within 10% of the requested FLOPs
SEARCH_TOLERANCE = 0.02  # the search for the share of channels stops within 2%
ROUND_TO = 8  # kept channels per layer: a multiple of this (see the module docstring)
_SHARE_CACHE: dict[tuple[str, float, int], ChannelShare] = {}  # (architecture, level, round_to)


class _FixedImportance(tp.importance.Importance):
    """Scores measured once on the unpruned network, served by the name of each group's root
    layer: pruning a fresh copy at another level reuses them (valid because pruning is one-shot,
    from the same unpruned network)."""

    def __init__(self, scores: dict[str, torch.Tensor], network: nn.Module):
        self.scores = scores
        self.names = {module: name for name, module in network.named_modules()}

    def __call__(self, group) -> torch.Tensor:
        return self.scores[self.names[group[0].dep.target.module]].clone()


def _pruner(network, input_shape, importance, ratios: dict | None = None) -> tp.pruner.MetaPruner:
    """Local pruning (each layer's channels ranked on their own) at the share `ratios` gives each
    group's root layer; the classifier's outputs (the classes) are kept."""
    network.eval()  # tracing runs a forward pass: BatchNorm statistics must not move
    last_linear = [m for m in network.modules() if isinstance(m, nn.Linear)][-1]
    example = torch.zeros(1, *input_shape, device=module_device(network))
    return tp.pruner.MetaPruner(
        network,
        example,
        importance=importance,
        pruning_ratio=0.0,
        pruning_ratio_dict=ratios,
        ignored_layers=[last_linear],
    )


def kept_channels(channels: int, ratio: float, round_to: int = ROUND_TO) -> int:
    """Channels a layer keeps when `ratio` of them go: a multiple of `round_to`, at least
    `round_to` (a layer with no more than `round_to` channels keeps them all)."""
    if channels <= round_to:
        return channels
    return max(round_to, int(channels * (1 - ratio) + 1e-9) // round_to * round_to)


@dataclass(frozen=True)
class ChannelShare:
    """The share of channels each layer loses: `low` for every layer, except the `widest`
    widest ones (by channels, then name), which lose `high`. One share for all layers
    (`widest=0`) moves the FLOPs in steps once channels are rounded; giving the next share to
    the widest layers one by one fills the steps, so a level's FLOPs can be met within 10%."""

    low: float
    high: float = 0.0
    widest: int = 0

    def kept(self, channels: dict[str, int], round_to: int = ROUND_TO) -> dict[str, int]:
        order = sorted(channels, key=lambda name: (-channels[name], name))
        return {
            name: kept_channels(channels[name], self.high if rank < self.widest else self.low, round_to)
            for rank, name in enumerate(order)
        }


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


def prune_channels(
    network, input_shape, scores, share: ChannelShare, round_to: int = ROUND_TO
) -> dict[str, list[int]]:
    """Remove the lowest-scored channels of every layer as `share` says, in place; returns what
    went (root layer -> channel indices)."""
    modules = dict(network.named_modules())
    kept = share.kept({name: len(score) for name, score in scores.items()}, round_to)
    ratios = {}
    for name, score in scores.items():
        # the pruner keeps int(n * (1 - ratio)) channels: aim half a channel above `kept`
        ratios[modules[name]] = 0.0 if kept[name] == len(score) else 1 - (kept[name] + 0.5) / len(score)
    pruner = _pruner(network, input_shape, _FixedImportance(scores, network), ratios)
    pruner.step()
    network.to(memory_format=torch.channels_last)
    return {name: sorted(int(i) for i in idxs) for name, is_out, idxs in pruner.pruning_history() if is_out}


def flops_of(network, input_shape) -> int:
    return count_flops(network.eval(), torch.zeros(1, *input_shape, device=module_device(network)))[0]


def channel_share_for(
    network, input_shape, fraction: float, key: str, round_to: int = ROUND_TO
) -> ChannelShare:
    """The share of channels to remove from the layers so that the measured FLOPs fall within
    2% of (1 - fraction) of the unpruned network's, or as close as the rounding allows: one
    share for every layer, found by bisection, then (between two neighbouring steps) the higher
    one for as many of the widest layers as brings the FLOPs closest. It depends on the
    architecture only (not on weights or scores), so it is searched once per `key` (the
    architecture), level and `round_to`."""
    if (key, fraction, round_to) in _SHARE_CACHE:
        return _SHARE_CACHE[(key, fraction, round_to)]
    scores = magnitude_scores(network, input_shape)
    full = flops_of(network, input_shape)
    target = (1 - fraction) * full

    def flops_at(share: ChannelShare) -> int:
        pruned = copy.deepcopy(network)
        prune_channels(pruned, input_shape, scores, share, round_to)
        return flops_of(pruned, input_shape)

    def closer(a: tuple[int, ChannelShare], b: tuple[int, ChannelShare]) -> tuple[int, ChannelShare]:
        return min(a, b, key=lambda m: abs(m[0] - target))

    # FLOPs fall monotonically with the share until every layer is down to `round_to` channels.
    lowest = (flops_at(ChannelShare(1.0)), ChannelShare(1.0))
    if lowest[0] > (1 + FLOPS_TOLERANCE) * target:
        narrowest = min(scores, key=lambda name: len(scores[name]))
        raise SettingsError(
            f"prune level {fraction} (personalisation.prune_flops_fraction or prune_levels) would remove "
            f"every channel of some layers (e.g. {narrowest!r}, {len(scores[narrowest])} channels; each "
            f"layer keeps at least {round_to}); this network allows at most {1 - lowest[0] / full:.2f}"
        )
    above, below = (full, ChannelShare(0.0)), lowest  # FLOPs >= target, < target
    ratio = 1 - math.sqrt(1 - fraction)  # FLOPs ~ (1 - ratio)^2
    for _ in range(30):
        measured = (flops_at(ChannelShare(ratio)), ChannelShare(ratio))
        if abs(measured[0] - target) <= SEARCH_TOLERANCE * target:
            return _SHARE_CACHE.setdefault((key, fraction, round_to), measured[1])
        above, below = (measured, below) if measured[0] >= target else (above, measured)
        if below[1].low - above[1].low < 1e-4:
            break
        ratio = (above[1].low + below[1].low) / 2
    best = closer(above, below)
    few, many = 0, len(scores)  # the widest layers that take the higher share
    while many - few > 1:
        middle = (few + many) // 2
        share = ChannelShare(above[1].low, below[1].low, middle)
        measured = (flops_at(share), share)
        best = closer(best, measured)
        few, many = (middle, many) if measured[0] >= target else (few, middle)
    return _SHARE_CACHE.setdefault((key, fraction, round_to), best[1])
