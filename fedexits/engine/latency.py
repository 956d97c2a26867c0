"""Per-exit latency in the runtime a device deploys (ONNX Runtime) or, on request, eager PyTorch.

Eager PyTorch at batch 1 is dominated by per-op dispatch on a small network: the 28x28
MobileNetV2 takes ~3 ms eager and ~0.5 ms in ONNX Runtime, and only ONNX Runtime's per-exit
cost follows the FLOPs. So latency is measured in ONNX Runtime by default.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from ..errors import check_settings
from .export import export_onnx
from .inference import fold_batchnorm
from .onnx_runtime import DEFAULT_PROVIDERS, OnnxEarlyExit
from .profiling import LATENCY_BATCH_SIZES, LATENCY_REPEATS, measure_latency

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
