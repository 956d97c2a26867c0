"""FEMNIST from LEAF's preprocessed JSON, converted once into the compact cache.

LEAF writes {"users": [...], "num_samples": [...], "user_data": {writer: {"x": [[784 floats in
[0, 1], 1.0 = white]], "y": [0..61]}}} into train/ and test/ (its own per-writer split). We merge a
writer's train and test parts (the per-user split is ours) and store uint8 with ink bright.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from tqdm import tqdm

from fedexits.data.base import DataError
from fedexits.data.cache import CacheWriter, ImageCache, open_or_build
from fedexits.data.femnist import FEMNIST_CLASSES

LEAF_SPLITS = ("train", "test")


def find_leaf_files(path: str) -> list[str]:
    """The LEAF JSON files under path/train and path/test (or directly in path, like all_data/)."""
    if not os.path.exists(path):
        raise DataError(f"LEAF path {path} does not exist")
    if not os.path.isdir(path):
        raise DataError(f"LEAF path {path} is not a folder; expected one with train/ and test/")
    files = [f for split in LEAF_SPLITS for f in sorted(glob.glob(os.path.join(path, split, "*.json")))]
    if not files:
        files = sorted(glob.glob(os.path.join(path, "*.json")))
    if not files:
        raise DataError(
            f"no LEAF JSON in {path}: expected train/*.json and test/*.json "
            "(all_data_*_niid_*_train_*.json, all_data_*_niid_*_test_*.json)"
        )
    return files


def _load_json(file: str) -> dict:
    try:
        with open(file) as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise DataError(f"corrupt LEAF JSON {file}: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"unreadable LEAF JSON {file}: {error}") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("users"), list)
        or not isinstance(data.get("user_data"), dict)
    ):
        raise DataError(f"{file} is not LEAF JSON: expected keys users, num_samples, user_data")
    return data


def leaf_writer_images(file: str, writer: str, entry) -> tuple[np.ndarray, np.ndarray]:
    """One writer's (uint8 (n, 28, 28) ink bright, int64 labels) from its LEAF JSON entry."""
    where = f"{file}: writer {writer}"
    if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
        raise DataError(f"{where} has no x/y data")
    try:
        pixels = np.asarray(entry["x"], dtype=np.float32)
        labels = np.asarray(entry["y"], dtype=np.float64)
    except (ValueError, TypeError):
        raise DataError(f"{where}: x should be rows of 784 numbers and y numbers") from None
    if pixels.ndim != 2 or pixels.shape[1] != 784 or labels.shape != (len(pixels),):
        raise DataError(
            f"{where}: expected x of shape (n, 784) and n labels, got {pixels.shape} and {labels.shape}"
        )
    if len(pixels) and (pixels.min() < -1e-3 or pixels.max() > 1 + 1e-3):
        raise DataError(f"{where}: pixel values outside [0, 1]")
    bad = labels[(labels != np.round(labels)) | (labels < 0) | (labels >= FEMNIST_CLASSES)]
    if len(bad):
        raise DataError(f"{where} has label {bad[0]:g}; FEMNIST labels are 0..61")
    images = np.rint((1.0 - pixels.clip(0, 1)) * 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, labels.astype(np.int64)


def convert_leaf(files: list[str], writer: CacheWriter) -> dict:
    """Add every writer of every file to the cache writer; a writer's parts are merged."""
    images_per_split = dict.fromkeys(LEAF_SPLITS, 0)
    for file in tqdm(files, desc="LEAF JSON", disable=None):
        data = _load_json(file)
        split = os.path.basename(os.path.dirname(file))
        for user in data["users"]:
            if user not in data["user_data"]:
                raise DataError(f"{file}: writer {user} is listed in users but not in user_data")
            images, labels = leaf_writer_images(file, user, data["user_data"][user])
            if len(labels):
                writer.add(str(user), images, labels)
            if split in images_per_split:
                images_per_split[split] += len(labels)
    return {"files": len(files), "leaf_images_per_split": images_per_split}


def leaf_cache(path: str, cache_dir: str) -> ImageCache:
    """The compact cache of a LEAF folder, converting it the first time (keyed by the path)."""
    path = os.path.abspath(os.path.expanduser(path))
    files = find_leaf_files(path)
    settings = {"source": "femnist_leaf", "path": path}
    return open_or_build(
        cache_dir,
        "femnist_leaf",
        settings,
        lambda writer: convert_leaf(files, writer),
        sources=files,
        base=path,
    )
