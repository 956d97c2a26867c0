"""Early-exit inference: dynamic (confidence thresholds) and fixed-exit (truncated network)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SettingsError
from .calibration import ExitCosts
from .device import module_device


@dataclass
class EarlyExitOutput:
    predictions: torch.Tensor  # (N,) int64
    exit_taken: torch.Tensor  # (N,) int64, M = final classifier
    confidence: torch.Tensor  # (N,) top-1 softmax at the exit taken
    mflops: torch.Tensor  # (N,) MFLOPs spent on each sample

    @property
    def total_mflops(self) -> float:
        return float(self.mflops.sum())


def normalise_thresholds(thresholds, num_exits: int) -> list[float | None]:
    """One threshold for all exits, or one per early exit; None/NaN switches an exit off."""
    if thresholds is None or isinstance(thresholds, (int, float)):
        thresholds = [thresholds] * num_exits
    thresholds = [
        None if t is None or (isinstance(t, float) and math.isnan(t)) else float(t) for t in thresholds
    ]
    if len(thresholds) != num_exits:
        raise SettingsError(f"expected {num_exits} thresholds (one per early exit), got {len(thresholds)}")
    for t in thresholds:
        if t is not None and not 0.0 <= t <= 1.0:
            raise SettingsError(f"thresholds must be in [0, 1], got {t}")
    return thresholds


def ensure_eval(model) -> None:
    """Evaluation mode, cheaply: `model.eval()` walks every module, which at batch 1 costs about
    as much as the first exit's compute, so only the three top-level parts are checked."""
    for part in (model.blocks, model.exits, model.classifier):
        if part.training:
            part.eval()


@torch.no_grad()
def dynamic_inference(model, x: torch.Tensor, thresholds, costs, batch_size: int = 256) -> EarlyExitOutput:
    """Each sample leaves at the first exit whose top-1 softmax exceeds its threshold, else at the
    final classifier. Samples that left are dropped from the batch, so later blocks do less work.
    `costs`: the model's cost table, or `ExitCosts.flops(table)` computed once (cheaper per call)."""
    thresholds = normalise_thresholds(thresholds, model.num_exits)
    ensure_eval(model)
    if not isinstance(costs, ExitCosts):
        costs = ExitCosts.flops(costs)
    costs = costs.per_exit([t is not None for t in thresholds]).float()
    at_block = {j: k for k, j in enumerate(model.exit_after)}
    device = module_device(model)
    n = len(x)
    predictions = torch.empty(n, dtype=torch.long)
    exit_taken = torch.empty(n, dtype=torch.long)
    confidence = torch.empty(n)
    for start in range(0, n, batch_size):
        h = x[start : start + batch_size].to(device)
        alive = torch.arange(start, start + len(h))
        for j, block in enumerate(model.blocks):
            h = block(h)
            k = at_block.get(j)
            if k is None or thresholds[k] is None:
                continue
            conf, pred = (t.cpu() for t in model.exits[k](h).softmax(dim=1).max(dim=1))
            leave = conf > thresholds[k]
            if leave.any():
                ids = alive[leave]
                predictions[ids], exit_taken[ids], confidence[ids] = pred[leave], k, conf[leave]
                stay = ~leave
                h, alive = h[stay.to(device)], alive[stay]
                if len(alive) == 0:
                    break
        if len(alive):
            conf, pred = (t.cpu() for t in model.classifier(h).softmax(dim=1).max(dim=1))
            predictions[alive], exit_taken[alive], confidence[alive] = pred, model.num_exits, conf
    return EarlyExitOutput(predictions, exit_taken, confidence, costs[exit_taken])


@torch.no_grad()
def fixed_exit_inference(model, x: torch.Tensor, exit_index: int, batch_size: int = 256) -> torch.Tensor:
    """Logits of the network truncated at `exit_index` (M = full network)."""
    ensure_eval(model)
    device = module_device(model)
    return torch.cat(
        [
            model.forward_to_exit(x[s : s + batch_size].to(device), exit_index).cpu()
            for s in range(0, len(x), batch_size)
        ]
    )


@torch.no_grad()
def exit_probabilities(model, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Softmax of every exit for every sample: (M+1, N, classes). One pass; what calibration,
    evaluation and profiling work from."""
    ensure_eval(model)
    device = module_device(model)
    parts = [
        torch.stack(model(x[s : s + batch_size].to(device))).softmax(dim=-1).cpu()
        for s in range(0, len(x), batch_size)
    ]
    return torch.cat(parts, dim=1)


def exit_accuracies(probs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Top-1 accuracy of every exit against `targets`."""
    return (probs.argmax(-1) == targets).double().mean(dim=1).tolist()  # exact ratios, no float32 tails


def labels_or_final(probs: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Targets for exits' probabilities (M+1, N, classes): the label where known, else the final
    exit's top-1 (the pseudo-label personalisation trains unlabelled samples on)."""
    return torch.where(labelled, y, probs[-1].argmax(-1))


def fold_batchnorm(model):
    """An inference copy with every BatchNorm folded into the preceding convolution (as a mobile
    runtime deploys it): same outputs up to rounding, fewer ops per block. Blocks, heads and the
    classifier are traced one by one, so the multi-exit structure is kept."""
    import copy

    from torch.fx.experimental.optimization import fuse

    folded = copy.deepcopy(model).eval()
    folded.blocks = torch.nn.ModuleList(fuse(block) for block in folded.blocks)
    folded.exits = torch.nn.ModuleList(fuse(head) for head in folded.exits)
    folded.classifier = fuse(folded.classifier)
    return folded
