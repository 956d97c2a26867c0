"""FLOPs, parameters and exit placement, measured with `torch.utils.flop_counter`.

FLOPs follow the flop counter's convention (a multiply-add is 2 FLOPs; convolutions and matrix
products are counted, element-wise ops are not), always on the model's real input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import SettingsError


def count_flops(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """FLOPs of one call and its output."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = module(x)
    return counter.get_total_flops(), out


def module_device(module: nn.Module) -> torch.device:
    """Where a module's parameters live (the CPU for a module without parameters): the engine
    moves its inputs there."""
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


def count_params(modules: nn.Module | Sequence[nn.Module]) -> int:
    if isinstance(modules, nn.Module):
        modules = [modules]
    return sum(p.numel() for m in modules for p in m.parameters())


def block_flops(
    blocks: Sequence[nn.Module], classifier: nn.Module, input_shape: Sequence[int]
) -> tuple[list[int], int, list[torch.Size]]:
    """Per-block FLOPs for one sample, the classifier's FLOPs, and each block's output shape."""
    x = torch.zeros(1, *input_shape, device=module_device(blocks[0]))
    flops, shapes = [], []
    was_training = [m.training for m in blocks]
    for block in blocks:
        block.eval()
        f, x = count_flops(block, x)
        flops.append(f)
        shapes.append(x.shape[1:])
    for block, mode in zip(blocks, was_training):
        block.train(mode)
    classifier_flops, _ = count_flops(classifier, x)
    return flops, classifier_flops, shapes


def place_exits(cumulative_fraction: Sequence[float], num_exits: int) -> list[int]:
    """Blocks after which to attach `num_exits` exits so that exit i sits as close as possible to
    i/(M+1) of the backbone's FLOPs; positions are distinct and increasing (exact DP over the
    total absolute deviation). The last block is excluded: it feeds the final classifier."""
    candidates = list(cumulative_fraction[:-1])
    if num_exits < 1:
        raise SettingsError(f"model.num_exits must be >= 1, got {num_exits}")
    if num_exits > len(candidates):
        raise SettingsError(
            f"model.num_exits must be <= {len(candidates)} (the blocks this backbone can attach "
            f"exits after), got {num_exits}"
        )
    targets = [(i + 1) / (num_exits + 1) for i in range(num_exits)]
    inf = float("inf")
    n = len(candidates)
    cost = [[inf] * n for _ in range(num_exits)]
    parent = [[-1] * n for _ in range(num_exits)]
    for j in range(n):
        cost[0][j] = abs(candidates[j] - targets[0])
    for i in range(1, num_exits):
        best, best_j = inf, -1
        for j in range(i, n):
            if cost[i - 1][j - 1] < best:
                best, best_j = cost[i - 1][j - 1], j - 1
            cost[i][j] = best + abs(candidates[j] - targets[i])
            parent[i][j] = best_j
    j = min(range(n), key=lambda k: cost[num_exits - 1][k])
    positions = [j]
    for i in range(num_exits - 1, 0, -1):
        j = parent[i][j]
        positions.append(j)
    return positions[::-1]


def cost_table(model) -> pd.DataFrame:
    """Per exit (0..M-1) and for the final classifier (M): FLOPs and parameters.

    - `mflops`: cost of the network truncated at that exit (backbone prefix + its head).
    - `dynamic_mflops`: cost of a sample leaving there under dynamic inference, which also
      evaluated every earlier head.
    - `params`: parameters needed to run to that exit; `head_params`: the head alone.
    """
    flops, classifier_flops, shapes = block_flops(model.blocks, model.classifier, model.input_shape)
    prefix = [sum(flops[: j + 1]) for j in range(len(flops))]
    rows, heads_so_far = [], 0
    for k, (head, j) in enumerate(zip(model.exits, model.exit_after)):
        was_training = head.training
        head.eval()
        head_flops, _ = count_flops(head, torch.zeros(1, *shapes[j], device=module_device(head)))
        head.train(was_training)
        heads_so_far += head_flops
        rows.append(
            dict(
                exit=k,
                attach_block=j,
                backbone_mflops=prefix[j] / 1e6,
                head_mflops=head_flops / 1e6,
                mflops=(prefix[j] + head_flops) / 1e6,
                dynamic_mflops=(prefix[j] + heads_so_far) / 1e6,
                params=count_params(list(model.blocks[: j + 1]) + [head]),
                head_params=count_params(head),
            )
        )
    full = prefix[-1] + classifier_flops
    rows.append(
        dict(
            exit=model.num_exits,
            attach_block=len(model.blocks) - 1,
            backbone_mflops=prefix[-1] / 1e6,  # the final exit's "head" is the classifier
            head_mflops=classifier_flops / 1e6,
            mflops=full / 1e6,
            dynamic_mflops=(full + heads_so_far) / 1e6,
            params=count_params([model.blocks, model.classifier]),
            head_params=count_params(model.classifier),
        )
    )
    table = pd.DataFrame(rows)
    table["flops_fraction"] = table["mflops"] / table["mflops"].iloc[-1]
    return table
