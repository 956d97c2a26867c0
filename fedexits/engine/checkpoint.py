"""Checkpoints: written atomically with the config that made them, read with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import atomic_write
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


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint {path} is corrupt or not a torch file ({reason[:120]})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a fedexits checkpoint (expected format {FORMAT})")
    return checkpoint


def check_architecture(path, checkpoint: dict, spec: MultiExitSpec) -> None:
    expected, found = spec.architecture(), checkpoint["architecture"]
    diff = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {path} is for another architecture ({detail})")


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
        raise ValueError(
            f"checkpoint {path} attaches exits after blocks {checkpoint['exit_after']}, "
            f"this version places them after {list(model.exit_after)}"
        )
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise ValueError(
            f"checkpoint {path} does not fit its architecture: {str(exc).splitlines()[0]}"
        ) from None
    model.eval()
    return model, checkpoint
