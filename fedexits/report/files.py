"""Atomic file writes and JSON cleaning for report outputs.

Every output is written to a temporary file in the target directory and then moved into place
with `os.replace`, so a crash or a concurrent reader never sees a half-written CSV, PNG or JSON
(sweeps read job directories while other jobs may still be writing).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd


def _atomic_write(path: Path, write: Callable[[IO], None], mode: str) -> Path:
    """Write through `write(fileobj)` into a temp file next to `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    # os.open with 0o666 lets the umask decide the final permissions, as for a plain open();
    # tempfile.mkstemp would leave the file readable by its owner only.
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        encoding = None if "b" in mode else "utf-8"
        newline = None if "b" in mode else ""
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as handle:
            write(handle)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return _atomic_write(path, lambda handle: handle.write(text), "w")


def atomic_write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """Write without the index; an empty frame still gets its header row."""
    return _atomic_write(path, lambda handle: frame.to_csv(handle, index=False), "w")


def atomic_write_json(obj: Any, path: Path) -> Path:
    """Strict JSON (NaN/inf become null) so any JSON reader can load it."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def atomic_save_figure(figure, path: Path) -> Path:
    """Save a matplotlib Figure as PNG atomically (format given explicitly: the temp name has
    no .png suffix)."""
    return _atomic_write(
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
