"""Deployment: a multi-exit model with one user's exits, exported to ONNX one segment at a time.

A single ONNX graph cannot stop half-way for the samples that are already confident (not without
control flow that runtimes run poorly), so the backbone is cut at every exit's attach point:
segment i runs the blocks between attach points i-1 and i, and dynamic early exit becomes a small
host loop over segment graphs that stops at the first confident exit (`onnx_runtime.py`). Each
exit head, the final classifier and the network truncated at every exit (fixed-exit mode, and
what latency profiling times) are graphs of their own. `manifest.json` says which file is which
and carries the user's thresholds, active exits and the cost table.

Everything is written into a temporary directory that is renamed into place: a crash or a bad
input never leaves a half-written export.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, SettingsError
from ..models import cost_table
from .checkpoint import load_model
from .inference import fold_batchnorm, normalise_thresholds
from .saved_exits import apply_exits, load_exits

FORMAT = "fedexits-onnx-v1"
MANIFEST = "manifest.json"
# Opset 18: the lowest the torch.export-based exporter emits natively, and run by every current
# ONNX Runtime (desktop and mobile).
OPSET = 18
INPUT, OUTPUT = "input", "output"  # every graph has one input and one output, batch first
GRAPH_KINDS = ("segments", "exits", "classifier", "truncated", "stages")
STAGE_OUTPUTS = ("features", "confidence", "prediction")
EXPORTERS = ("torchscript", "dynamo")


@dataclass
class ExportSettings:
    """How a model becomes ONNX graphs.

    `exporter`: torch's TorchScript-based exporter exports these small convolutional graphs ~10x
    faster than the torch.export-based one ("dynamo": 0.3-0.8 s vs 3-8 s per graph here, which
    matters for a latency profile per run and an export per user) with the same outputs; it is
    deprecated since torch 2.9, so "dynamo" is the way forward once it is removed."""

    fold_bn: bool = True  # fold BatchNorm into the convolutions first, as a device deploys it
    opset: int = OPSET
    exporter: str = "torchscript"  # or "dynamo"

    def __post_init__(self):
        if self.exporter not in EXPORTERS:
            raise SettingsError(f"export exporter must be one of {list(EXPORTERS)}, got {self.exporter!r}")
        if not (isinstance(self.opset, int) and self.opset >= 7):
            raise SettingsError(f"export opset must be an integer >= 7, got {self.opset!r}")


class Stage(nn.Module):
    """The deployed early-exit path, one graph per active exit: the blocks since the previous
    active exit and this exit's head, returning the features (for the samples that go on) and
    each sample's top-1 softmax and class; the last stage ends with the final classifier.

    Every graph boundary costs ONNX Runtime a layout conversion of the feature map (~30 us at
    batch 1 on the 28x28 MobileNetV2, 6% of the whole network), so the deployed path cuts the
    backbone only where the user's active exits are, and computes the top-1 in the graph."""

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Module, final: bool = False):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.head = head
        self.final = final

    def forward(self, x):
        features = self.blocks(x)
        confidence, prediction = self.head(features).softmax(dim=1).max(dim=1)
        return (confidence, prediction) if self.final else (features, confidence, prediction)


def graph_modules(model, active_exits: Sequence[bool]) -> dict[str, list[nn.Module]]:
    """The modules exported, by kind: `segments` (M+1: input..attach point of exit 0, ...,
    after the last attach point..end of backbone), `exits` (M heads), `classifier` (1),
    `truncated` (M+1: the network truncated at exit k; the last is the whole network) and
    `stages` (one per active exit, then the final one; see `Stage`)."""
    bounds = [-1, *model.exit_after, len(model.blocks) - 1]
    blocks = list(model.blocks)
    segments = [nn.Sequential(*blocks[a + 1 : b + 1]) for a, b in zip(bounds, bounds[1:])]
    truncated = [nn.Sequential(*blocks[: j + 1], head) for j, head in zip(model.exit_after, model.exits)]
    truncated.append(nn.Sequential(*blocks, model.classifier))
    stages, start = [], 0
    for on, j, head in zip(active_exits, model.exit_after, model.exits):
        if on:
            stages.append(Stage(blocks[start : j + 1], head))
            start = j + 1
    stages.append(Stage(blocks[start:], model.classifier, final=True))
    return {
        "segments": segments,
        "exits": list(model.exits),
        "classifier": [model.classifier],
        "truncated": truncated,
        "stages": stages,
    }


def stage_outputs(stage: Stage) -> tuple[str, ...]:
    return STAGE_OUTPUTS[1:] if stage.final else STAGE_OUTPUTS


def graph_file(kind: str, index: int) -> str:
    return "classifier.onnx" if kind == "classifier" else f"{kind.removesuffix('s')}_{index}.onnx"


def export_graph(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int = OPSET,
    exporter: str = "torchscript",
    outputs: Sequence[str] = (OUTPUT,),
) -> None:
    """One module as one ONNX graph with a dynamic batch dimension (see `ExportSettings`)."""
    module.eval()
    common = dict(input_names=[INPUT], output_names=list(outputs), opset_version=opset)
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: batch},),
            verbose=False,
            **common,
        )
        return
    with warnings.catch_warnings():  # the deprecation notices of the TorchScript-based exporter
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            dynamic_axes={name: {0: "batch"} for name in (INPUT, *outputs)},
            **common,
        )


def user_thresholds(thresholds, active_exits: Sequence[bool] | None, num_exits: int) -> list[float | None]:
    """Per-exit thresholds (None: exit off) from a calibration's threshold and active exits."""
    per_exit = normalise_thresholds(thresholds, num_exits)
    if active_exits is None:
        return per_exit
    active = list(active_exits)
    if len(active) != num_exits or not all(isinstance(a, (bool, int)) and a in (0, 1) for a in active):
        raise SettingsError(f"active_exits must be {num_exits} booleans (one per early exit), got {active}")
    missing = [k for k, (t, on) in enumerate(zip(per_exit, active)) if on and t is None]
    if missing:
        raise SettingsError(f"exits {missing} are active but have no threshold")
    return [t if on else None for t, on in zip(per_exit, active)]


def _check_out_dir(out_dir: Path) -> None:
    """Only an empty directory or a previous export may be replaced."""
    if out_dir.exists() and (
        not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file())
    ):
        raise SettingsError(f"export directory {out_dir} exists and is not an ONNX export; choose another")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move a finished export into place; a previous export there is swapped out, then removed."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old.{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def export_onnx(
    model,
    out_dir: str | Path,
    thresholds: float | Sequence[float | None] | None = None,
    active_exits: Sequence[bool] | None = None,
    settings: ExportSettings | None = None,
    metadata: dict | None = None,
    **overrides,
) -> Path:
    """Export `model` (shared backbone and classifier plus one user's exits) to `out_dir`.

    `thresholds`: one for all exits or one per early exit (None/NaN: off), typically a
    calibration's `threshold` with its `active_exits`; None exports no early exit. `settings`
    (or keyword overrides such as `fold_bn=False`): see `ExportSettings`. `metadata`: plain data
    stored in the manifest (user, source files...). Returns the manifest's path."""
    settings = replace(settings or ExportSettings(), **overrides)
    out_dir = Path(out_dir)
    per_exit = user_thresholds(thresholds, active_exits, model.num_exits)
    _check_out_dir(out_dir)
    table = cost_table(model)
    deployed = fold_batchnorm(model) if settings.fold_bn else copy.deepcopy(model).eval()
    active = [t is not None for t in per_exit]
    modules = graph_modules(deployed, active)
    x = torch.zeros(2, *model.input_shape)  # batch 2, so no exporter specialises the batch to 1
    with torch.no_grad():
        attach = [x]
        for segment in modules["segments"]:
            attach.append(segment.eval()(attach[-1]))
    examples = {"segments": attach[:-1], "exits": attach[1:-1], "classifier": attach[-1:]}
    examples["truncated"] = [x] * len(modules["truncated"])
    examples["stages"] = [x] + [attach[k + 1] for k, on in enumerate(active) if on]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        graphs, checksums = {}, {}
        for kind in GRAPH_KINDS:
            graphs[kind] = []
            for index, (module, example) in enumerate(zip(modules[kind], examples[kind])):
                name = graph_file(kind, index)
                outputs = stage_outputs(module) if kind == "stages" else (OUTPUT,)
                export_graph(module, example, tmp / name, settings.opset, settings.exporter, outputs)
                graphs[kind].append(name)
                checksums[name] = sha256(tmp / name)
        manifest = {
            "format": FORMAT,
            "architecture": model.spec.architecture() if hasattr(model, "spec") else None,
            "input_shape": list(model.input_shape),
            "num_exits": model.num_exits,
            "exit_after": list(model.exit_after),
            "thresholds": per_exit,
            "active_exits": active,
            "costs": json.loads(table.to_json(orient="records")),
            "graphs": graphs,
            "sha256": checksums,
            "input_name": INPUT,
            "output_name": OUTPUT,
            "opset": settings.opset,
            "exporter": settings.exporter,
            "batchnorm_folded": settings.fold_bn,
            "versions": {"torch": torch.__version__, "onnx": _onnx_version()},
            "metadata": metadata or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / MANIFEST


def _onnx_version() -> str:
    import onnx  # only for its version: imported here, it costs nothing to who does not export

    return onnx.__version__


def export_user(
    checkpoint: str | Path,
    exits_file: str | Path,
    out_dir: str | Path,
    settings: ExportSettings | None = None,
    **overrides,
) -> Path:
    """A run's global checkpoint plus one user's saved exits (`save_exits`) as an ONNX export
    with that user's threshold and active exits. Returns the manifest's path."""
    settings = replace(settings or ExportSettings(), **overrides)
    model, _ = load_model(checkpoint)
    saved = load_exits(exits_file)
    apply_exits(model, saved)
    metadata = {"checkpoint": str(checkpoint), "exits_file": str(exits_file), **saved.extra}
    return export_onnx(model, out_dir, saved.threshold, saved.active_exits, settings, metadata=metadata)


def read_manifest(path: str | Path) -> tuple[Path, dict]:
    """(directory, manifest) of an export; `path` is the directory or its manifest. Refuses a
    missing or corrupt manifest, an inconsistent one, and missing or altered graph files."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"ONNX manifest {path} does not exist")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"ONNX manifest {path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"ONNX manifest {path} is not a fedexits export (expected format {FORMAT})")
    required = (
        "num_exits",
        "input_shape",
        "thresholds",
        "active_exits",
        "costs",
        "exit_after",
        "graphs",
        "sha256",
    )
    missing = [key for key in required if key not in manifest]
    if missing:
        raise CheckpointError(f"ONNX manifest {path} is incomplete (no {', '.join(missing)})")
    types = {"num_exits": int, "graphs": dict, "sha256": dict}
    bad = [key for key, kind in types.items() if not isinstance(manifest[key], kind)]
    if bad:
        raise CheckpointError(f"ONNX manifest {path} has malformed {', '.join(bad)}")
    m = manifest["num_exits"]
    expected = {"thresholds": m, "active_exits": m, "costs": m + 1, "exit_after": m}
    expected.update({"segments": m + 1, "exits": m, "classifier": 1, "truncated": m + 1})
    if isinstance(manifest["active_exits"], list):
        expected["stages"] = sum(bool(a) for a in manifest["active_exits"]) + 1
    for key, n in expected.items():
        found = manifest["graphs"].get(key) if key in GRAPH_KINDS else manifest[key]
        if not isinstance(found, list) or len(found) != n:
            got = len(found) if isinstance(found, list) else repr(found)
            raise CheckpointError(f"ONNX manifest {path} has {got} {key} for {m} exits (expected {n})")
    for t, on in zip(manifest["thresholds"], manifest["active_exits"]):
        if not (t is None or (isinstance(t, (int, float)) and 0 <= t <= 1)) or on != (t is not None):
            raise CheckpointError(f"ONNX manifest {path} has bad thresholds {manifest['thresholds']}")
    for kind in GRAPH_KINDS:
        for name in manifest["graphs"][kind]:
            graph = path.parent / str(name)
            if graph.parent != path.parent:
                raise CheckpointError(f"ONNX manifest {path} names a graph outside its directory: {name!r}")
            if not graph.is_file():
                raise CheckpointError(f"ONNX graph {graph} named in {path} does not exist")
            if sha256(graph) != manifest["sha256"].get(name):
                raise CheckpointError(f"ONNX graph {graph} does not match its checksum in {path} (corrupt)")
    return path.parent, manifest
