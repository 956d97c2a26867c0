"""Profiling on this machine (paper 3.3): per-exit latency, confidence and accuracy, peak memory."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence

import pandas as pd
import psutil
import torch

from .calibration import ExitCosts


def median_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3, max_seconds: float = 5.0) -> float:
    """Median wall time of `fn` in milliseconds; stops early (after at least 3 runs) once
    `max_seconds` are spent, so big models at big batches stay affordable."""
    for _ in range(warmup):
        fn()
    times, spent = [], 0.0
    while len(times) < repeats and (len(times) < 3 or spent < max_seconds):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed * 1e3)
        spent += elapsed
    return statistics.median(times)


@torch.no_grad()
def measure_latency(model, batch_sizes: Sequence[int] = (1, 32), repeats: int = 20) -> pd.DataFrame:
    """Per exit (0..M, M = full network): latency of the network truncated there and of its head
    alone, at each batch size (median of repeated runs, inputs of the model's shape)."""
    model.eval()
    rows = []
    for b in batch_sizes:
        x = torch.randn(b, *model.input_shape)
        features, _ = model.backbone_features(x)
        last = x
        for block in model.blocks:
            last = block(last)
        head_inputs = features + [last]
        heads = list(model.exits) + [model.classifier]
        for k, (head, h) in enumerate(zip(heads, head_inputs)):
            rows.append(
                dict(
                    exit=k,
                    batch_size=b,
                    latency_ms=median_ms(lambda: model.forward_to_exit(x, k), repeats),
                    head_ms=median_ms(lambda: head(h), repeats),
                )
            )
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


def peak_memory_mb(fn: Callable[[], object], interval_s: float = 0.002) -> tuple[object, float]:
    """Run `fn` and return (its result, peak increase of this process's resident memory in MB).
    PyTorch has no CPU allocator statistics, so RSS is sampled from a thread."""
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, process.memory_info().rss)
    return result, (peak - baseline) / 2**20
