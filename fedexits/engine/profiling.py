"""Profiling on this machine (paper 3.3): per-exit latency, confidence and accuracy, peak memory."""

from __future__ import annotations

import functools
import statistics
import time
import weakref
from collections.abc import Callable, Sequence

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .calibration import ExitCosts

# Per-exit latency is measured at batch 1 (a phone classifying one image) and at a larger batch.
LATENCY_BATCH_SIZES = (1, 32)
LATENCY_REPEATS = 20


def _elapsed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def interleaved_medians_ms(
    fns: Sequence[Callable[[], object]], repeats: int = 20, warmup: int = 3, max_seconds: float = 10.0
) -> list[float]:
    """Median wall time of each function, timed round-robin (fn 0, fn 1, ..., fn 0, ...), so a
    transient disturbance (another process, a GC pause) spreads over all of them instead of
    skewing one. Stops early, after at least 3 rounds, once `max_seconds` are spent."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    started = time.perf_counter()
    while len(times[0]) < repeats and (len(times[0]) < 3 or time.perf_counter() - started < max_seconds):
        for fn, measured in zip(fns, times):
            measured.append(_elapsed_ms(fn))
    return [statistics.median(measured) for measured in times]


@torch.no_grad()
def measure_latency(
    model, batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES, repeats: int = LATENCY_REPEATS
) -> pd.DataFrame:
    """Per exit (0..M, M = full network): latency of the network truncated there and of its head
    alone, at each batch size (median of repeated, interleaved runs on inputs of the model's
    shape)."""
    model.eval()
    rows = []
    for b in batch_sizes:
        x = torch.randn(b, *model.input_shape)
        head_inputs = model.attach_point_features(x)  # every exit's input, then the classifier's
        heads = list(model.exits) + [model.classifier]
        exits = range(len(heads))
        truncated = [functools.partial(model.forward_to_exit, x, k) for k in exits]
        alone = [functools.partial(head, h) for head, h in zip(heads, head_inputs)]
        medians = interleaved_medians_ms(truncated + alone, repeats)
        for k in exits:
            rows.append(dict(exit=k, batch_size=b, latency_ms=medians[k], head_ms=medians[len(heads) + k]))
    table = pd.DataFrame(rows)
    table["per_sample_ms"] = table["latency_ms"] / table["batch_size"]
    return table


def latency_costs(latency: pd.DataFrame, batch_size: int = 1) -> ExitCosts:
    """Latency in the form calibration uses: the prefix to each attach point is the truncated
    network's latency minus its head's."""
    rows = latency[latency["batch_size"] == batch_size].sort_values("exit")
    if rows.empty:
        raise ValueError(f"no latency measured at batch size {batch_size}")
    heads = rows["head_ms"].clip(lower=0).tolist()
    backbone = (rows["latency_ms"] - rows["head_ms"]).clip(lower=0).tolist()
    return ExitCosts(backbone, heads)


def confidence_profile(probs: torch.Tensor, targets: torch.Tensor) -> pd.DataFrame:
    """Per exit: mean top-1 confidence, accuracy, and confidence on right vs wrong predictions
    (what makes a threshold separate them)."""
    confidence, predictions = probs.max(dim=-1)
    correct = predictions == targets[None]
    rows = []
    for k in range(probs.shape[0]):
        right, wrong = confidence[k][correct[k]], confidence[k][~correct[k]]
        rows.append(
            dict(
                exit=k,
                accuracy=correct[k].double().mean().item(),
                mean_confidence=confidence[k].mean().item(),
                confidence_correct=right.mean().item() if len(right) else float("nan"),
                confidence_wrong=wrong.mean().item() if len(wrong) else float("nan"),
            )
        )
    return pd.DataFrame(rows)


class LiveTensorMemory(TorchDispatchMode):
    """Tracks the bytes of every CPU tensor storage created under it and still alive; `peak` is
    the high-water mark. Exact and allocator-independent (RSS is not: a process reuses freed heap
    pages), but every op pays a Python hook, so do not time code while measuring it."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors using it]
        self.current = 0
        self.peak = 0

    def _release(self, address: int) -> None:
        entry = self.live.get(address)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[address]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                address = storage.data_ptr()
                if address == 0:
                    continue
                entry = self.live.get(address)
                if entry is None:
                    entry = self.live[address] = [storage.nbytes(), 0]
                    self.current += entry[0]
                    self.peak = max(self.peak, self.current)
                entry[1] += 1
                weakref.finalize(t, self._release, address)
        return out


def peak_memory_mb(fn: Callable[[], object]) -> tuple[object, float]:
    """Run `fn`; return (its result, peak MB of tensor memory allocated while it ran). Inputs
    that existed before are not counted; the memory-bound part of personalisation (feature cache,
    activations, gradients, optimizer state) is."""
    probe = LiveTensorMemory()
    with probe:
        result = fn()
    return result, probe.peak / 2**20
