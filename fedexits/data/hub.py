"""FEMNIST from Flower's dataset hub (flwrlabs/femnist), or local parquet files with its schema.

Columns: image (28x28 PNG, the `datasets` Image feature), writer_id (str), hsf_id (int),
character (ClassLabel of 62 names '0'-'9', 'A'-'Z', 'a'-'z'). flwr-datasets' NaturalIdPartitioner
on writer_id groups the rows into writers; that grouping runs once, during the conversion into
the compact cache, never in client processes (it costs seconds on the full 814k rows).
"""

from __future__ import annotations

import glob
import io
import os
import tempfile

import numpy as np
from PIL import Image
from tqdm import tqdm

from fedexits.data.base import DataError
from fedexits.data.cache import CacheWriter, ImageCache, open_or_build
from fedexits.data.glyphs import CHARACTERS

HUB_DATASET = "flwrlabs/femnist"
HUB_COLUMNS = ("image", "writer_id", "hsf_id", "character")
REQUIRED_COLUMNS = ("image", "writer_id", "character")


def parquet_files(path: str | list[str]) -> list[str]:
    """Expand a parquet file, a list of them, or a folder (searched recursively)."""
    files = []
    for item in [path] if isinstance(path, str) else path:
        item = os.path.abspath(os.path.expanduser(item))
        if not os.path.exists(item):
            raise DataError(f"parquet path {item} does not exist")
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "**", "*.parquet"), recursive=True))
            if not found:
                raise DataError(f"no *.parquet files in {item}; expected {HUB_DATASET} parquet files")
            files.extend(found)
        else:
            files.append(item)
    for file in files:
        check_parquet(file)
    return files


def check_parquet(file: str) -> None:
    """Read the footer and schema: catches truncated/corrupt files and wrong schemas cheaply."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(file).names
    except (OSError, ValueError, pa.ArrowException) as error:
        raise DataError(f"corrupt parquet {file}: {_one_line(error)}") from None
    missing = [column for column in REQUIRED_COLUMNS if column not in names]
    if missing:
        raise DataError(
            f"parquet {file} lacks column(s) {missing}; expected the {HUB_DATASET} schema {list(HUB_COLUMNS)}"
        )


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _label_mapping(feature, where: str):
    """A function turning the character column's values into 0..61 class indices."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        unknown = [name for name in feature.names if name not in CHARACTERS]
        if unknown or len(feature.names) != len(CHARACTERS):
            raise DataError(
                f"{where}: character classes {feature.names[:5]}... are not FEMNIST's "
                "62 classes 0-9, A-Z, a-z"
            )
        lookup = np.array([CHARACTERS.index(name) for name in feature.names])
        return lambda values: lookup[np.asarray(values, dtype=np.int64)]
    if getattr(feature, "dtype", None) == "string":

        def from_strings(values):
            bad = [v for v in values if v not in CHARACTERS or len(v) != 1]
            if bad:
                raise DataError(f"{where}: character {bad[0]!r} is not one of 0-9, A-Z, a-z")
            return np.array([CHARACTERS.index(v) for v in values])

        return from_strings
    return lambda values: np.asarray(values, dtype=np.int64)


def decode_images(cells: list, where: str) -> tuple[np.ndarray, int]:
    """PNG cells -> uint8 (n, 28, 28) with ink bright, and how many were dark-on-white.

    Polarity is decided per image by the mean of its border pixels (background dominates there).
    """
    images = np.empty((len(cells), 28, 28), np.uint8)
    for index, cell in enumerate(cells):
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if data is None and isinstance(cell, dict) and cell.get("path"):
            with open(cell["path"], "rb") as f:
                data = f.read()
        try:
            image = Image.open(io.BytesIO(data)).convert("L")
        except (OSError, ValueError) as error:
            raise DataError(f"{where}: image {index} is not a readable image ({_one_line(error)})") from None
        if image.size != (28, 28):
            image = image.resize((28, 28), Image.Resampling.LANCZOS)
        images[index] = np.asarray(image)
    border = np.concatenate(
        [images[:, 0, :], images[:, -1, :], images[:, 1:-1, 0], images[:, 1:-1, -1]], axis=1
    )
    dark_on_white = border.mean(axis=1) > 127.5
    images[dark_on_white] = 255 - images[dark_on_white]
    return images, int(dark_on_white.sum())


def convert_dataset(dataset, writer: CacheWriter, source_name: str) -> dict:
    """Group a `datasets.Dataset` in the hub schema by writer and add each writer to the cache."""
    import datasets
    from flwr_datasets.partitioner import NaturalIdPartitioner

    to_label = _label_mapping(dataset.features["character"], source_name)
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    partitioner = NaturalIdPartitioner(partition_by="writer_id")
    partitioner.dataset = dataset
    inverted = 0
    for partition_id in tqdm(range(partitioner.num_partitions), desc="writers", disable=None):
        writer_id = str(partitioner.partition_id_to_natural_id[partition_id])
        where = f"{source_name}: writer {writer_id}"
        rows = partitioner.load_partition(partition_id)[:]
        labels = to_label(rows["character"])
        bad = labels[(labels < 0) | (labels >= len(CHARACTERS))]
        if len(bad):
            raise DataError(f"{where} has label {bad[0]}; FEMNIST labels are 0..61")
        images, dark_on_white = decode_images(rows["image"], where)
        inverted += dark_on_white
        writer.add(writer_id, images, labels)
    return {"rows": len(dataset), "writers": partitioner.num_partitions, "inverted": inverted}


def _load_parquet(files: list[str], scratch: str):
    import datasets

    try:
        return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=scratch)
    except Exception as error:  # noqa: BLE001 (datasets/pyarrow raise many types; we name the file)
        raise DataError(
            f"could not read parquet {files[0] if len(files) == 1 else files}: {_one_line(error)}"
        ) from None


def _load_hub(dataset_id: str):
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    try:
        federated = FederatedDataset(
            dataset=dataset_id,
            partitioners={"train": NaturalIdPartitioner(partition_by="writer_id")},
        )
        return federated.load_split("train")
    except Exception as error:  # noqa: BLE001 (network, hub and datasets errors alike)
        raise DataError(
            f"could not download {dataset_id} from the hub ({_one_line(error)}); "
            "offline? set path to local parquet files"
        ) from None


def hub_cache(path: str | list[str] | None, cache_dir: str, dataset_id: str = HUB_DATASET) -> ImageCache:
    """The compact cache of hub FEMNIST (downloaded) or of local parquet files, built once."""
    if path is None:
        settings = {"source": "femnist_hub", "dataset": dataset_id}
        files = None

        def build(writer: CacheWriter) -> dict:
            return convert_dataset(_load_hub(dataset_id), writer, dataset_id)
    else:
        files = parquet_files(path)
        settings = {"source": "femnist_hub", "path": files}

        def build(writer: CacheWriter) -> dict:
            # datasets converts parquet to arrow files; keep them only for the conversion
            os.makedirs(cache_dir, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".hf-scratch-", dir=cache_dir) as scratch:
                dataset = _load_parquet(files, scratch)
                name = files[0] if len(files) == 1 else os.path.dirname(files[0])
                return convert_dataset(dataset, writer, name)

    return open_or_build(cache_dir, "femnist_hub", settings, build, sources=files)
