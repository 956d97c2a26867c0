"""An exported multi-exit model (`export.export_onnx`) run by ONNX Runtime, as a device runs it.

Dynamic early exit is a small host loop: one step per active exit, each running the backbone
since the previous step and that exit's head; the samples whose top-1 softmax beats the
threshold leave, the others go on (dropped from the batch as in `inference.dynamic_inference`,
with the same semantics and output). The user's deployed exits run as the export's stage graphs
(one graph per step); any other choice of thresholds chains the per-attach-point segments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import torch

from ..errors import DataError, SettingsError
from .calibration import ExitCosts
from .export import INPUT, read_manifest
from .inference import EarlyExitOutput, normalise_thresholds
from .profiling import LATENCY_BATCH_SIZES, LATENCY_REPEATS, interleaved_medians_ms

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def session_options(threads: int = 1, inter_op_threads: int = 1) -> ort.SessionOptions:
    """Sequential execution on `threads` intra-op threads: one thread is what a phone core or a
    virtual client gets, and what the latency profile measures."""
    for name, value in (("threads", threads), ("inter_op_threads", inter_op_threads)):
        if not (isinstance(value, int) and value >= 1):
            raise SettingsError(f"onnxruntime {name} must be an integer >= 1, got {value!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def check_providers(providers: Sequence[str] | None) -> list[str]:
    providers = list(providers or DEFAULT_PROVIDERS)
    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise SettingsError(f"onnxruntime providers {unknown} are not available here; available: {available}")
    return providers


def top1(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 softmax, argmax) per row: the largest softmax entry is 1 / sum(exp(z - max z))."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return 1.0 / np.exp(shifted).sum(axis=1), logits.argmax(axis=1)


class OnnxEarlyExit:
    """The graphs of one export, one ONNX Runtime session each (created on first use).

    `threads`/`inter_op_threads`: per session (default 1, sequential); `providers`: ONNX Runtime
    execution providers in order of preference (default CPU)."""

    def __init__(
        self,
        manifest: str | Path,
        threads: int = 1,
        inter_op_threads: int = 1,
        providers: Sequence[str] | None = None,
    ):
        self.directory, self.manifest = read_manifest(manifest)
        self.num_exits = int(self.manifest["num_exits"])
        self.input_shape = tuple(self.manifest["input_shape"])
        self.thresholds: list[float | None] = list(self.manifest["thresholds"])
        self.costs = pd.DataFrame(self.manifest["costs"])
        self.flops = ExitCosts.flops(self.costs)
        self.options = session_options(threads, inter_op_threads)
        self.providers = check_providers(providers)
        self._runs: dict[tuple[str, int], object] = {}

    def run(self, kind: str, index: int, x: np.ndarray) -> np.ndarray:
        """Run one graph (`kind` as in the manifest's `graphs`) on a float32 batch."""
        return self.run_all(kind, index, x)[0]

    def run_all(self, kind: str, index: int, x: np.ndarray) -> list[np.ndarray]:
        """Every output of one graph (stages have several)."""
        key = (kind, index)
        if key not in self._runs:
            path = self.directory / self.manifest["graphs"][kind][index]
            session = ort.InferenceSession(str(path), self.options, providers=self.providers)
            self._runs[key] = functools.partial(session.run, None)
        return self._runs[key]({INPUT: x})

    def as_input(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """A C-contiguous float32 array of the export's input shape."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().contiguous().numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise DataError(f"inputs have shape {tuple(x.shape)}, the export expects (N, {self.input_shape})")
        return x

    def dynamic_inference(self, x, thresholds="manifest", batch_size: int = 256) -> EarlyExitOutput:
        """Early exit at `thresholds` ("manifest": the user's calibrated ones; else as for
        `inference.dynamic_inference`: one for all exits or one per exit, None switches off).
        A single sample takes a lean path (no batch bookkeeping): on a device, where images
        come one at a time, the host loop's own cost is what separates wall-clock from FLOPs."""
        m = self.num_exits
        if isinstance(thresholds, str):
            if thresholds != "manifest":
                raise SettingsError(f"thresholds must be numbers, None or 'manifest', got {thresholds!r}")
            thresholds = self.thresholds
        thresholds = normalise_thresholds(thresholds, m)
        x = self.as_input(x)
        active = tuple(t is not None for t in thresholds)
        steps, costs = self.steps(active), self.costs_per_exit(active)
        n = len(x)
        predictions = np.empty(n, dtype=np.int64)
        exit_taken = np.empty(n, dtype=np.int64)
        confidence = np.empty(n, dtype=np.float32)
        if n == 1:
            h = x
            for k, step in steps:
                h, conf, pred = step(h)
                if k == m or conf[0] > thresholds[k]:
                    predictions[0], exit_taken[0], confidence[0] = pred[0], k, conf[0]
                    break
        else:
            for start in range(0, n, batch_size):
                h = x[start : start + batch_size]
                alive = np.arange(start, start + len(h))
                for k, step in steps:
                    h, conf, pred = step(h)
                    leave = conf > thresholds[k] if k < m else np.ones(len(alive), dtype=bool)
                    if leave.any():
                        ids = alive[leave]
                        predictions[ids], exit_taken[ids], confidence[ids] = pred[leave], k, conf[leave]
                        stay = ~leave
                        if not stay.any():
                            break
                        h, alive = h[stay], alive[stay]
        return EarlyExitOutput(
            torch.from_numpy(predictions),
            torch.from_numpy(exit_taken),
            torch.from_numpy(confidence),
            torch.from_numpy(costs[exit_taken]),
        )

    @functools.lru_cache(maxsize=8)  # noqa: B019  (a few patterns per runner)
    def steps(self, active: tuple[bool, ...]) -> list[tuple[int, Callable]]:
        """(exit, step) for each active exit and the final classifier; a step maps the features
        where the previous one stopped to (features, top-1 softmax, class). The exits the
        manifest deploys run as its stage graphs (one run per step); any other choice of exits
        chains the per-attach-point segments and heads."""
        exits = [k for k, on in enumerate(active) if on] + [self.num_exits]
        if list(active) == self.manifest["active_exits"]:
            return [(k, functools.partial(self._stage, i, k)) for i, k in enumerate(exits)]
        firsts = [0] + [k + 1 for k in exits[:-1]]
        return [(k, functools.partial(self._segments_then_head, first, k)) for first, k in zip(firsts, exits)]

    def _stage(self, index: int, exit_index: int, h: np.ndarray):
        outputs = self.run_all("stages", index, h)
        return (None, *outputs) if exit_index == self.num_exits else outputs

    def _segments_then_head(self, first: int, exit_index: int, h: np.ndarray):
        for segment in range(first, exit_index + 1):
            h = self.run("segments", segment, h)
        if exit_index == self.num_exits:
            return (None, *top1(self.run("classifier", 0, h)))
        return (h, *top1(self.run("exits", exit_index, h)))

    @functools.lru_cache(maxsize=8)  # noqa: B019  (a few patterns per runner; at batch 1 it counts)
    def costs_per_exit(self, active: tuple[bool, ...]) -> np.ndarray:
        """MFLOPs of a sample leaving at each exit 0..M when the `active` early exits run."""
        return self.flops.per_exit(active).float().numpy()

    def fixed_exit_inference(self, x, exit_index: int, batch_size: int = 256) -> torch.Tensor:
        """Logits of the network truncated at `exit_index` (M = full network), one graph."""
        if not 0 <= exit_index <= self.num_exits:
            raise SettingsError(f"exit index must be in 0..{self.num_exits}, got {exit_index}")
        x = self.as_input(x)
        parts = [
            self.run("truncated", exit_index, x[s : s + batch_size]) for s in range(0, len(x), batch_size)
        ]
        return torch.from_numpy(np.concatenate(parts))

    def exit_logits(self, x, batch_size: int = 256) -> list[torch.Tensor]:
        """Logits of every exit (early exits first, the final classifier last), like the
        PyTorch model's forward: what calibration on the device would use."""
        x = self.as_input(x)
        outputs: list[list[np.ndarray]] = [[] for _ in range(self.num_exits + 1)]
        for start in range(0, len(x), batch_size):
            features = self.attach_point_features(x[start : start + batch_size])
            for k in range(self.num_exits):
                outputs[k].append(self.run("exits", k, features[k]))
            outputs[-1].append(self.run("classifier", 0, features[-1]))
        return [torch.from_numpy(np.concatenate(parts)) for parts in outputs]

    def attach_point_features(self, x: np.ndarray) -> list[np.ndarray]:
        """Every exit's input, then the classifier's (the whole backbone's output)."""
        features = []
        for k in range(self.num_exits + 1):
            x = self.run("segments", k, x)
            features.append(x)
        return features

    def measure_latency(
        self, batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES, repeats: int = LATENCY_REPEATS, seed: int = 0
    ) -> pd.DataFrame:
        """Per exit (0..M): latency of the truncated graph and of the head alone, at each batch
        size; the same table as `profiling.measure_latency`, timed round-robin."""
        rows = []
        for b in batch_sizes:
            x = np.random.default_rng(seed).standard_normal((b, *self.input_shape), dtype=np.float32)
            head_inputs = self.attach_point_features(x)
            exits = range(self.num_exits + 1)
            truncated = [functools.partial(self.run, "truncated", k, x) for k in exits]
            alone = [functools.partial(self.run, "exits", k, head_inputs[k]) for k in exits[:-1]]
            alone.append(functools.partial(self.run, "classifier", 0, head_inputs[-1]))
            medians = interleaved_medians_ms(truncated + alone, repeats)
            for k in exits:
                rows.append(
                    dict(exit=k, batch_size=b, latency_ms=medians[k], head_ms=medians[len(truncated) + k])
                )
        table = pd.DataFrame(rows)
        table["per_sample_ms"] = table["latency_ms"] / table["batch_size"]
        return table
