"""Every data configuration key, with its default, in one place.

`build_population(cfg)` reads a flat mapping (a dict or a Hydra DictConfig). `cfg["source"]`
picks one of the dataclasses below; every other key must be a field of that dataclass (unknown
keys and wrong values raise a one-line DataError). Hydra YAMLs (conf/dataset/*.yaml) mirror these
fields one to one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedexits.data.base import DataError


@dataclass(frozen=True)
class CommonConfig:
    """Keys shared by every source.

    source: which data source builds the population.
    cache_dir: where caches live ("~" is expanded); each source keeps a subfolder per setting.
        Default: $FEDEXITS_CACHE_DIR/data, else ~/.cache/fedexits/data (what the CLI uses too).
    seed: chooses held-out users and each user's test split; for synthetic data it also seeds the
        images (another seed = other writers), for imagenet_folder the users' samples.
    num_held_out: how many users are held out (chosen with `seed` among users with >= min_images);
        for imagenet_folder, how many users are sampled from the user pool.
    held_out_file: text file with one user id per line; when set it replaces num_held_out.
    n_test: test images per user. A user with fewer than n_test / max_test_fraction images holds
        out max_test_fraction of its images instead, and UserData.notes says so.
    max_test_fraction: the largest share of a user's images that goes to its test split.
    min_images: users with fewer images are left out of the population (the global pool included);
        asking for one (load_user, held_out_file) raises DataError.
    """

    source: str = "synthetic"
    cache_dir: str | None = None  # None: default_cache_dir()
    seed: int = 0
    num_held_out: int = 50
    held_out_file: str | None = None
    n_test: int = 100
    max_test_fraction: float = 0.5
    min_images: int = 10


@dataclass(frozen=True)
class SyntheticConfig(CommonConfig):
    """Offline FEMNIST-like handwriting: 62 classes, 28x28, one persistent style per writer.

    num_writers: writers generated (held-out ones included).
    images_per_writer_mean / images_per_writer_sd / images_per_writer_min: a writer's image count
        is normal with this mean and sd (FEMNIST: 227 and 89), clipped below at the minimum.
    style_strength: how different writers are. 0 = every writer writes in the same style (one
        font; no writer-specific slant, rotation, scale, position, pen width, ink, noise or
        per-character distortion); 1 = default; higher = more
        distinct writers. Continuous params scale linearly; the chance that a writer uses its own
        font rather than the shared base font is min(1, style_strength).
    label_skew: how concentrated a writer's classes are. 0 = every writer follows the global
        FEMNIST-like class prior; higher = fewer classes per writer: class frequencies are drawn
        from Dirichlet(62 * prior / label_skew). Effective classes per writer (exp entropy):
        0 -> 34, 1 -> 24, 5 -> 13, 10 -> 9, 20 -> 6, 50 -> 3.
    sample_jitter: variation between one writer's images of the same class (pose, distortion,
        pen width); 0 = a writer's images of a class differ only by pixel noise.
    """

    num_writers: int = 500
    images_per_writer_mean: float = 227.0
    images_per_writer_sd: float = 89.0
    images_per_writer_min: int = 40
    style_strength: float = 1.0
    label_skew: float = 0.0
    sample_jitter: float = 1.0


@dataclass(frozen=True)
class FemnistLeafConfig(CommonConfig):
    """Real FEMNIST from LEAF's preprocessed JSON (converted once into the compact cache).

    path: LEAF data folder holding train/*.json and test/*.json
        (all_data_*_niid_*_{train,test}_*.json); a writer's train and test parts are merged.
    """

    path: str | None = None


@dataclass(frozen=True)
class FemnistHubConfig(CommonConfig):
    """Real FEMNIST from Flower's dataset hub (flwrlabs/femnist), converted once into the cache.

    path: local parquet file, list of files or folder of *.parquet with the hub's schema (image,
        writer_id, hsf_id, character); null downloads `dataset` with flwr-datasets.
    dataset: hub dataset id used when path is null.
    """

    path: str | list[str] | None = None
    dataset: str = "flwrlabs/femnist"


@dataclass(frozen=True)
class ImageNetFolderConfig(CommonConfig):
    """Personalised ImageNet from a torchvision ImageFolder tree.

    path: root folder. With train/ and val/ inside, train/ is the global pool and users are
        sampled from val/ (both in class-folder layout: ILSVRC-2012's flat val/ must first be
        sorted into class folders, as for torchvision's ImageFolder). Otherwise root holds the
        class folders directly, and a seeded
        `user_pool_fraction` of each class is set aside for users (the rest is the global pool).
    image_size / resize_size: Resize(resize_size) then CenterCrop(image_size), then ImageNet
        mean/std normalisation; resize_size null means round(image_size * 256 / 224).
    images_per_user: images sampled (without duplicates) for each held-out user.
    popularity_sigma: width, in class indices, of each user's Gaussian label popularity around
        its random centre (circular distance, so the class order wraps around).
    num_global_users: the global pool is split into this many IID shards, the global users
        (federated clients); the global pool itself is the whole training set. load_user on a
        global user loads its whole shard into memory: fine for small folders, not for ImageNet
        (train the global model from global_train_set() there).
    user_pool_fraction: share of each class reserved for users when there is no train/val split.
    min_images applies to images_per_user; held_out_file is not supported (users are
    generated, named user_000, user_001, ...).
    """

    path: str | None = None
    image_size: int = 224
    resize_size: int | None = None
    images_per_user: int = 500
    popularity_sigma: float = 10.0
    num_global_users: int = 10
    user_pool_fraction: float = 0.2


CONFIG_CLASSES: dict[str, type[CommonConfig]] = {
    "synthetic": SyntheticConfig,
    "femnist_hub": FemnistHubConfig,
    "femnist_leaf": FemnistLeafConfig,
    "imagenet_folder": ImageNetFolderConfig,
}

# (key, lowest allowed value, whether the bound is inclusive)
_LOWER_BOUNDS = {
    "num_held_out": (0, True),
    "n_test": (1, True),
    "max_test_fraction": (0.0, False),
    "min_images": (2, True),
    "num_writers": (2, True),
    "images_per_writer_mean": (1.0, True),
    "images_per_writer_sd": (0.0, True),
    "images_per_writer_min": (2, True),
    "style_strength": (0.0, True),
    "label_skew": (0.0, True),
    "sample_jitter": (0.0, True),
    "image_size": (1, True),
    "resize_size": (1, True),
    "images_per_user": (2, True),
    "popularity_sigma": (0.0, False),
    "num_global_users": (1, True),
    "user_pool_fraction": (0.0, False),
}
_UPPER_BOUNDS = {"max_test_fraction": 1.0, "user_pool_fraction": 1.0}


def _as_plain(value: Any) -> Any:
    """Hydra gives ListConfig/DictConfig; turn sequences into plain lists."""
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "__iter__") and not isinstance(value, Mapping):
        return [_as_plain(item) for item in value]
    return value


def _check_type(source: str, key: str, value: Any, annotation: str) -> Any:
    def fail(expected: str) -> DataError:
        return DataError(f"{source} config: {key}={value!r} should be {expected}")

    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise fail("set (it cannot be null)")
    if annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise fail("an integer")
    elif annotation.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        value = float(value)
    elif annotation.startswith("str | list"):
        if isinstance(value, list):
            if not value or not all(isinstance(item, str) for item in value):
                raise fail("a path or a non-empty list of paths")
        elif not isinstance(value, str):
            raise fail("a path or a list of paths")
    elif annotation.startswith("str") and not isinstance(value, str):
        raise fail("a string")
    if key in _LOWER_BOUNDS:
        low, inclusive = _LOWER_BOUNDS[key]
        if value < low or (value == low and not inclusive):
            raise fail(f"{'>=' if inclusive else '>'} {low}")
    if key in _UPPER_BOUNDS and value > _UPPER_BOUNDS[key]:
        raise fail(f"<= {_UPPER_BOUNDS[key]}")
    return value


def parse_config(cfg: Mapping) -> CommonConfig:
    """Validate a flat mapping into the dataclass of its source; DataError on anything wrong."""
    if not isinstance(cfg, Mapping):
        raise DataError(f"data config should be a mapping, got {type(cfg).__name__}")
    raw = {str(key): _as_plain(value) for key, value in cfg.items()}
    source = raw.get("source", CommonConfig.source)
    if source not in CONFIG_CLASSES:
        raise DataError(f"unknown data source {source!r}; expected one of {sorted(CONFIG_CLASSES)}")
    config_class = CONFIG_CLASSES[source]
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise DataError(
            f"unknown key(s) {unknown} for data source {source!r}; expected some of {sorted(fields)}"
        )
    values = {key: _check_type(source, key, value, str(fields[key].type)) for key, value in raw.items()}
    values["source"] = source
    values["cache_dir"] = os.path.abspath(os.path.expanduser(values.get("cache_dir") or default_cache_dir()))
    if source in ("femnist_leaf", "imagenet_folder") and values.get("path") is None:
        raise DataError(f"{source} config: path is required")
    if source == "imagenet_folder" and values.get("held_out_file") is not None:
        raise DataError("imagenet_folder config: held_out_file is not supported (users are generated)")
    return config_class(**values)


def default_cache_dir() -> str:
    """The data cache shared by notebooks and `python -m fedexits.simulate`."""
    return os.path.join(os.environ.get("FEDEXITS_CACHE_DIR", "~/.cache/fedexits"), "data")


def config_defaults(source: str) -> dict[str, Any]:
    """Default values of every key of one source (handy for writing YAMLs and reports)."""
    config_class = CONFIG_CLASSES[source]
    return {f.name: f.default for f in dataclasses.fields(config_class)} | {"source": source}
