"""Checkpoints: written atomically with the config that made them, read with weights_only=True.

A missing, corrupt or mismatched file raises CheckpointError (one line naming the file)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import atomic_write
from ..errors import CheckpointError
from ..models import MultiExitSpec, build_multi_exit

FORMAT = "fedexits-checkpoint-v1"


def atomic_torch_save(obj, path: str | Path) -> None:
    atomic_write(Path(path), lambda handle: torch.save(obj, handle), "wb")


def save_checkpoint(path: str | Path, model, **extra) -> None:
    """`extra`: plain data only (config dicts, epoch, optimizer state, history)."""
    atomic_torch_save(
        {
            "format": FORMAT,
            "architecture": model.spec.architecture(),
            "exit_after": list(model.exit_after),
            "state_dict": model.state_dict(),
            **extra,
        },
        path,
    )


def load_torch_file(path: str | Path, what: str, remedy: str = "delete it or give another path"):
    """`torch.load(weights_only=True)` of a file the user names (`what`: "checkpoint", "exits
    file"...); a missing, foreign or damaged file is a CheckpointError saying what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    with open(path, "rb") as handle:
        is_zip = handle.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    if not is_zip:
        raise CheckpointError(
            f"{what} {path} is not a file written by torch.save; delete it or give another path"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or damaged archive: torch raises a zoo of types
        raise CheckpointError(
            f"{what} {path} is truncated or corrupt ({type(exc).__name__}); {remedy}"
        ) from None


def read_checkpoint(path: str | Path) -> dict:
    checkpoint = load_torch_file(path, "checkpoint", remedy="delete it to train the model again")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a fedexits checkpoint (expected format {FORMAT})")
    return checkpoint


def check_architecture(path, checkpoint: dict, spec: MultiExitSpec) -> None:
    expected, found = spec.architecture(), checkpoint["architecture"]
    diff = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"checkpoint {path} is for another architecture ({detail})")


def load_model(path: str | Path, spec: MultiExitSpec | None = None):
    """Rebuild the model stored in a checkpoint; with `spec`, refuse a checkpoint of another
    architecture. Returns (model, checkpoint dict)."""
    checkpoint = read_checkpoint(path)
    if spec is not None:
        check_architecture(path, checkpoint, spec)
    arch = dict(checkpoint["architecture"])
    arch["input_shape"] = tuple(arch["input_shape"])
    model = build_multi_exit(MultiExitSpec(**arch))
    if list(model.exit_after) != list(checkpoint["exit_after"]):
        raise CheckpointError(
            f"checkpoint {path} attaches exits after blocks {checkpoint['exit_after']}, "
            f"this version places them after {list(model.exit_after)}"
        )
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit its architecture: {str(exc).splitlines()[0]}"
        ) from None
    model.eval()
    return model, checkpoint
