"""Small on-disk fixtures for the data tests: LEAF JSON, hub-schema parquet, ImageFolder trees."""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

CHARACTERS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def ink_images(rng: np.random.Generator, count: int) -> np.ndarray:
    """uint8 (count, 28, 28), ink bright: a random bright bar on a black background."""
    images = np.zeros((count, 28, 28), np.uint8)
    for image in images:
        row, col = rng.integers(6, 20, size=2)
        image[row : row + 3, col - 4 : col + 4] = rng.integers(150, 256)
    return images


def write_leaf(root: str, writers: dict[str, tuple[int, int]], seed: int = 0) -> dict[str, np.ndarray]:
    """LEAF folder with train/ and test/ JSON; writers maps id -> (n_train, n_test).

    Writers are spread over two files per split. Returns each writer's expected uint8 images
    (train part then test part), ink bright.
    """
    rng = np.random.default_rng(seed)
    expected = {}
    files = {
        split: [{"users": [], "num_samples": [], "user_data": {}} for _ in range(2)]
        for split in ("train", "test")
    }
    for index, (writer, sizes) in enumerate(writers.items()):
        parts = []
        for split, count in zip(("train", "test"), sizes):
            if count == 0:
                continue
            images = ink_images(rng, count)
            labels = rng.integers(0, 62, size=count)
            data = files[split][index % 2]
            data["users"].append(writer)
            data["num_samples"].append(count)
            x = (1.0 - images.reshape(count, 784) / 255.0).round(6).tolist()  # LEAF: 1.0 = white
            data["user_data"][writer] = {"x": x, "y": labels.tolist()}
            parts.append(images)
        expected[writer] = np.concatenate(parts)
    for split, datas in files.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for k, data in enumerate(datas):
            name = f"all_data_{k}_niid_05_keep_0_{split}_9.json"
            with open(os.path.join(root, split, name), "w") as f:
                json.dump(data, f)
    return expected


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_hub_parquet(
    path: str,
    writers: dict[str, int],
    seed: int = 0,
    dark_on_white: bool = True,
    character_feature=None,
    labels=None,
) -> dict[str, np.ndarray]:
    """A parquet file in the flwrlabs/femnist schema; rows of writers are interleaved.

    Returns each writer's expected uint8 images, ink bright, in row order.
    """
    import datasets

    rng = np.random.default_rng(seed)
    rows = [(writer, i) for writer, count in writers.items() for i in range(count)]
    rng.shuffle(rows)
    images = {writer: ink_images(rng, count) for writer, count in writers.items()}
    expected = {writer: [] for writer in writers}
    columns = {"image": [], "writer_id": [], "hsf_id": [], "character": []}
    for writer, i in rows:
        image = images[writer][i]
        expected[writer].append(image)
        stored = 255 - image if dark_on_white else image
        columns["image"].append({"bytes": png_bytes(stored), "path": None})
        columns["writer_id"].append(writer)
        columns["hsf_id"].append(int(rng.integers(0, 8)))
        columns["character"].append(int(rng.integers(0, 62)) if labels is None else labels)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "writer_id": datasets.Value("string"),
            "hsf_id": datasets.Value("int64"),
            "character": character_feature or datasets.ClassLabel(names=list(CHARACTERS)),
        }
    )
    datasets.Dataset.from_dict(columns, features=features).to_parquet(path)
    return {writer: np.stack(found) for writer, found in expected.items()}


def write_image_folder(root: str, classes: int, per_class: int, size: int = 8, seed: int = 0) -> None:
    """root/<class_k>/<i>.png, each image a solid colour that encodes its class."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        folder = os.path.join(root, f"class_{k:02d}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            colour = np.array([k * 10 % 256, 128, 255 - k * 10 % 256], np.uint8)
            image = np.broadcast_to(colour, (size, size, 3)).copy()
            image[0, 0] = rng.integers(0, 256, 3)
            Image.fromarray(image).save(os.path.join(folder, f"{i:03d}.png"))
