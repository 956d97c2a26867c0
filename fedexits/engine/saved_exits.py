"""One user's personalised exits and calibration, saved so that a run can be deployed later.

A run shares one global checkpoint; what is personal is small (the exit heads, the threshold and
which exits are on), so each user gets one file: `exits/<init>/<user>.pt`, a torch file read back with
`weights_only=True` holding plain data only:

    {"format": "fedexits-exits-v1", "architecture": {...}, "exit_after": [...],
     "exits": <state dict of model.exits>, "threshold": 0.85, "active_exits": [true, ...],
     "extra": {"user": "f0001_03", "accuracy_at_threshold": 0.91, ...}}

The architecture is stored so that exits are never loaded into a backbone they were not
trained on. `export.export_user` turns checkpoint + exits file into an ONNX export.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, SettingsError
from .checkpoint import atomic_torch_save, load_torch_file

EXITS_FORMAT = "fedexits-exits-v1"
EXITS_DIR = "exits"  # under a run directory


@dataclass(frozen=True)
class SavedExits:
    path: Path
    architecture: dict
    exit_after: list[int]
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    threshold: float | None
    active_exits: list[bool]
    extra: dict

    def thresholds(self) -> list[float | None]:
        """Per-exit thresholds for `dynamic_inference` (None: exit off)."""
        return [self.threshold if on else None for on in self.active_exits]


def exits_file(run_dir: str | Path, user: str, init: str = "global") -> Path:
    """Where a run keeps a user's exits: `RUN_DIR/exits/<init>/<user>.pt` (one folder per exit
    initialisation, since `init=compare` personalises every user three times)."""
    for name, value in (("user id", user), ("init", init)):
        if not value or value in (".", "..") or any(c in value for c in "/\\\0"):
            raise SettingsError(f"{name} {value!r} cannot name an exits file (no path separators)")
    return Path(run_dir) / EXITS_DIR / init / f"{user}.pt"


def save_exits(
    path: str | Path, model, threshold: float | None, active_exits: Sequence[bool], **extra
) -> Path:
    """Write `model`'s exits with a calibration's `threshold` and `active_exits` (atomically).
    `extra`: plain JSON-like data (user id, accuracy at the threshold...)."""
    active = [bool(a) for a in active_exits]
    if len(active) != model.num_exits:
        raise SettingsError(f"active_exits must have {model.num_exits} entries, got {len(active)}")
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise SettingsError(f"threshold must be in [0, 1], got {threshold}")
    path = Path(path)
    atomic_torch_save(
        {
            "format": EXITS_FORMAT,
            "architecture": model.spec.architecture(),
            "exit_after": list(model.exit_after),
            "exits": {k: v.detach().clone() for k, v in model.exits.state_dict().items()},
            "threshold": None if threshold is None else float(threshold),
            "active_exits": active,
            "extra": dict(extra),
        },
        path,
    )
    return path


def load_exits(path: str | Path) -> SavedExits:
    """Read and check an exits file; anything missing, corrupt or inconsistent is a
    CheckpointError naming the file."""
    path = Path(path)
    saved = load_torch_file(path, "exits file")
    if not isinstance(saved, dict) or saved.get("format") != EXITS_FORMAT:
        raise CheckpointError(
            f"exits file {path} is not a fedexits exits file (expected format {EXITS_FORMAT})"
        )
    keys = ("architecture", "exit_after", "exits", "threshold", "active_exits", "extra")
    missing = [k for k in keys if k not in saved]
    if missing:
        raise CheckpointError(f"exits file {path} lacks {', '.join(missing)}")
    exit_after, active = saved["exit_after"], saved["active_exits"]
    if not isinstance(active, list) or not isinstance(exit_after, list) or len(active) != len(exit_after):
        raise CheckpointError(
            f"exits file {path} has {_count(active)} active_exits flags for {_count(exit_after)} exits"
        )
    threshold = saved["threshold"]
    if threshold is not None and not (isinstance(threshold, float) and 0.0 <= threshold <= 1.0):
        raise CheckpointError(f"exits file {path} has threshold {threshold!r}; expected a number in [0, 1]")
    if threshold is None and any(active):
        raise CheckpointError(f"exits file {path} has active exits but no threshold")
    if not isinstance(saved["extra"], dict):
        raise CheckpointError(f"exits file {path} has extra {saved['extra']!r}; expected a dict")
    if not isinstance(saved["exits"], dict) or not all(
        isinstance(v, torch.Tensor) for v in saved["exits"].values()
    ):
        raise CheckpointError(f"exits file {path} does not hold a state dict of exit heads")
    return SavedExits(
        path=path,
        architecture=saved["architecture"],
        exit_after=[int(j) for j in exit_after],
        state_dict=saved["exits"],
        threshold=threshold,
        active_exits=[bool(a) for a in active],
        extra=saved["extra"],
    )


def _count(value) -> str:
    return str(len(value)) if isinstance(value, list) else repr(value)


def apply_exits(model, saved: SavedExits) -> None:
    """Load saved exits into `model` (in place); refuses exits of another architecture."""
    expected = model.spec.architecture()
    diff = {k: (saved.architecture.get(k), v) for k, v in expected.items() if saved.architecture.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: exits file {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"exits file {saved.path} is for another architecture ({detail})")
    if saved.exit_after != list(model.exit_after):
        raise CheckpointError(
            f"exits file {saved.path} attaches exits after blocks {saved.exit_after}, "
            f"the model after {list(model.exit_after)}"
        )
    try:
        model.exits.load_state_dict(saved.state_dict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"exits file {saved.path} does not fit the model's exits: {first}") from None
