"""Atomic file writes and JSON cleaning for report outputs.

Every output is written to a temporary file in the target directory and then moved into place
with `os.replace`, so a crash or a concurrent reader never sees a half-written CSV, PNG or JSON
(sweeps read job directories while other jobs may still be writing).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedexits.atomic import atomic_write


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text), "w")


def atomic_write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """Write without the index; an empty frame still gets its header row. Ten significant digits:
    what the numbers carry, without binary-float tails (0.46, not 0.46000000834465027)."""
    return atomic_write(path, lambda handle: frame.to_csv(handle, index=False, float_format="%.10g"), "w")


def atomic_write_json(obj: Any, path: Path) -> Path:
    """Strict JSON (NaN/inf become null) so any JSON reader can load it."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def atomic_save_figure(figure, path: Path) -> Path:
    """Save a matplotlib Figure as PNG atomically (format given explicitly: the temp name has
    no .png suffix)."""
    return atomic_write(
        path,
        lambda handle: figure.savefig(handle, format="png", dpi=120, bbox_inches="tight"),
        "wb",
    )


def to_jsonable(value: Any) -> Any:
    """Turn numpy/pandas scalars, NaN, NA, paths and tuples into plain JSON values."""
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return [to_jsonable(item) for item in value.tolist()]
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    return str(value)
