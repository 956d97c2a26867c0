"""Per-exit latency in the runtime a device deploys (ONNX Runtime) or, on request, eager PyTorch.

Eager PyTorch at batch 1 is dominated by per-op dispatch on a small network: the 28x28
MobileNetV2 takes ~3 ms eager and ~0.5 ms in ONNX Runtime, and only ONNX Runtime's per-exit
cost follows the FLOPs. So latency is measured in ONNX Runtime by default.
"""

from __future__ import annotations

import copy
import functools
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnxruntime as ort
import pandas as pd
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from ..errors import check_settings
from .export import INPUT, export_graph, export_onnx
from .inference import fold_batchnorm
from .onnx_runtime import DEFAULT_PROVIDERS, OnnxEarlyExit, check_providers, session_options
from .profiling import LATENCY_BATCH_SIZES, LATENCY_REPEATS, interleaved_medians_ms, measure_latency

RUNTIMES = ("onnxruntime", "eager")


@dataclass
class LatencySettings:
    """How per-exit latency is measured (one profile per run, on the shared model)."""

    runtime: str = "onnxruntime"  # or "eager" (PyTorch, as the model trains)
    batch_sizes: list[int] = field(default_factory=lambda: list(LATENCY_BATCH_SIZES))
    repeats: int = LATENCY_REPEATS
    threads: int = 1  # ONNX Runtime intra-op threads, or torch threads for eager
    fold_bn: bool = True  # BatchNorm folded into the convolutions, as deployed
    providers: list[str] = field(default_factory=lambda: list(DEFAULT_PROVIDERS))  # onnxruntime only

    def __post_init__(self):
        self.batch_sizes, self.providers = list(self.batch_sizes), list(self.providers)
        check_settings(
            "latency",
            self,
            [
                ("runtime", self.runtime in RUNTIMES, f"one of {list(RUNTIMES)}"),
                (
                    "batch_sizes",
                    bool(self.batch_sizes) and all(b >= 1 for b in self.batch_sizes),
                    "integers >= 1",
                ),
                ("batch_sizes", self.batch_sizes[:1] == [1], "a list starting with 1 (a device's batch)"),
                ("repeats", self.repeats >= 1, "an integer >= 1"),
                ("threads", self.threads >= 1, "an integer >= 1"),
                ("providers", bool(self.providers), "at least one onnxruntime provider"),
            ],
        )


def profile_exit_latency(model, settings: LatencySettings | None = None, **overrides) -> pd.DataFrame:
    """Per exit (0..M): latency of the network truncated there and of its head alone, at each
    batch size, in the chosen runtime; the table of `profiling.measure_latency` plus a `runtime`
    column. `profiling.latency_costs(table)` turns it into the calibration's `ExitCosts`."""
    settings = replace(settings or LatencySettings(), **overrides)
    if settings.runtime == "eager":
        deployed = fold_batchnorm(model) if settings.fold_bn else model
        threads = torch.get_num_threads()
        torch.set_num_threads(settings.threads)
        try:
            table = measure_latency(deployed, settings.batch_sizes, settings.repeats)
        finally:
            torch.set_num_threads(threads)
    else:
        with tempfile.TemporaryDirectory(prefix="fedexits-latency-") as tmp:
            manifest = export_onnx(model, Path(tmp) / "model", fold_bn=settings.fold_bn)
            runner = OnnxEarlyExit(manifest, threads=settings.threads, providers=settings.providers)
            table = runner.measure_latency(settings.batch_sizes, settings.repeats)
    table["runtime"] = settings.runtime
    return table


@torch.no_grad()
def network_latency_ms(
    networks: Sequence[nn.Module], input_shape: Sequence[int], settings: LatencySettings | None = None
) -> list[float]:
    """Batch-1 latency (ms) of plain networks (one input, one output; e.g. a pruned network),
    in the runtime of `settings` and timed round-robin, so their ratios hold on a busy machine."""
    settings = settings or LatencySettings()
    x = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
    deployed = [copy.deepcopy(n).cpu().eval() for n in networks]  # timed on the CPU, like the profile
    deployed = [fuse(n, inplace=True) for n in deployed] if settings.fold_bn else deployed
    if settings.runtime == "eager":
        threads = torch.get_num_threads()
        torch.set_num_threads(settings.threads)
        try:
            return interleaved_medians_ms([functools.partial(n, x) for n in deployed], settings.repeats)
        finally:
            torch.set_num_threads(threads)
    options, providers = session_options(settings.threads), check_providers(settings.providers)
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedexits-latency-") as tmp:
        for k, network in enumerate(deployed):
            path = Path(tmp) / f"network_{k}.onnx"
            export_graph(network, torch.zeros(2, *input_shape), path)
            session = ort.InferenceSession(str(path), options, providers=providers)
            runs.append(functools.partial(session.run, None, {INPUT: x.numpy()}))
    return interleaved_medians_ms(runs, settings.repeats)
