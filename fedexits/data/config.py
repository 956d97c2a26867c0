"""Every data configuration key, with its default, in one place.

`build_population(cfg)` reads a mapping (a dict or a Hydra DictConfig): `cfg["source"]` picks one
of the dataclasses below, OmegaConf checks every other key's name and type against it, and the
dataclass checks the values. These dataclasses are also the command line's `dataset` options
(registered as Hydra structured configs by `fedexits.study.config`): one definition of each
default for notebooks and the command line alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedexits.errors import SettingsError, check_settings, config_error_line


@dataclass
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
    num_held_out: int = 250
    held_out_file: str | None = None
    n_test: int = 100
    max_test_fraction: float = 0.5
    min_images: int = 10

    def __post_init__(self):
        check_settings(
            "dataset",
            self,
            [
                ("source", self.source == SOURCE_OF.get(type(self)), repr(SOURCE_OF.get(type(self)))),
                ("num_held_out", self.num_held_out >= 0, "an integer >= 0"),
                ("n_test", self.n_test >= 1, "an integer >= 1"),
                ("max_test_fraction", 0 < self.max_test_fraction <= 1, "in (0, 1]"),
                ("min_images", self.min_images >= 2, "an integer >= 2"),
            ],
        )
        self.cache_dir = os.path.abspath(os.path.expanduser(self.cache_dir or default_cache_dir()))


@dataclass
class SyntheticConfig(CommonConfig):
    """Offline FEMNIST-like handwriting: 62 classes, 28x28, one persistent style per writer.

    num_writers: writers generated (held-out ones included).
    images_per_writer_mean / images_per_writer_sd / images_per_writer_min: a writer's image count
        is normal with this mean and sd (FEMNIST: 227 and 89), clipped below at the minimum.
    style_strength: how different writers are. 0 = every writer writes in the same style (one
        font; no writer-specific slant, rotation, scale, position, pen width, ink, noise or
        per-character distortion); 1 = moderately distinct writers; 1.5 (default) = more.
        Continuous params scale linearly; the chance that a writer uses its own font rather than
        the shared base font is min(1, style_strength).
    label_skew: how concentrated a writer's classes are. 0 = every writer follows the global
        FEMNIST-like class prior; higher = fewer classes per writer: class frequencies are drawn
        from Dirichlet(62 * prior / label_skew). Effective classes per writer (exp entropy):
        0 -> 34, 1 -> 24, 5 (default) -> 13, 10 -> 9, 20 -> 6, 50 -> 3.
    sample_jitter: variation between one writer's images of the same class (pose, distortion,
        pen width); 0 = a writer's images of a class differ only by pixel noise.
    """

    source: str = "synthetic"
    num_writers: int = 400
    images_per_writer_mean: float = 227.0
    images_per_writer_sd: float = 89.0
    images_per_writer_min: int = 40
    style_strength: float = 1.5
    label_skew: float = 5.0
    sample_jitter: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_settings(
            "dataset",
            self,
            [
                ("num_writers", self.num_writers >= 2, "an integer >= 2"),
                ("images_per_writer_mean", self.images_per_writer_mean >= 1, ">= 1"),
                ("images_per_writer_sd", self.images_per_writer_sd >= 0, ">= 0"),
                ("images_per_writer_min", self.images_per_writer_min >= 2, "an integer >= 2"),
                ("style_strength", self.style_strength >= 0, ">= 0"),
                ("label_skew", self.label_skew >= 0, ">= 0"),
                ("sample_jitter", self.sample_jitter >= 0, ">= 0"),
            ],
        )


@dataclass
class FemnistLeafConfig(CommonConfig):
    """Real FEMNIST from LEAF's preprocessed JSON (converted once into the compact cache).

    path: LEAF data folder holding train/*.json and test/*.json
        (all_data_*_niid_*_{train,test}_*.json); a writer's train and test parts are merged.
    """

    source: str = "femnist_leaf"
    path: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.path is None:
            raise SettingsError("dataset.path is required: the LEAF data folder (with train/ and test/)")


@dataclass
class FemnistHubConfig(CommonConfig):
    """Real FEMNIST from Flower's dataset hub (flwrlabs/femnist), converted once into the cache.

    path: local parquet file, list of files or folder of *.parquet with the hub's schema (image,
        writer_id, hsf_id, character); null downloads `dataset` with flwr-datasets.
    dataset: hub dataset id used when path is null.
    """

    source: str = "femnist_hub"
    path: Any = None  # str | list[str] | None (OmegaConf has no such union: checked below)
    dataset: str = "flwrlabs/femnist"

    def __post_init__(self):
        super().__post_init__()
        paths = [self.path] if isinstance(self.path, str) else self.path
        if self.path is not None and not (
            isinstance(paths, list) and paths and all(isinstance(p, str) for p in paths)
        ):
            raise SettingsError(
                f"dataset.path must be a parquet path or a non-empty list of them, got {self.path!r}"
            )
        if isinstance(self.path, list):
            self.path = list(self.path)  # a plain list, not OmegaConf's ListConfig


@dataclass
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

    source: str = "imagenet_folder"
    path: str | None = None
    image_size: int = 224
    resize_size: int | None = None
    images_per_user: int = 500
    popularity_sigma: float = 10.0
    num_global_users: int = 10
    user_pool_fraction: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        if self.path is None:
            raise SettingsError("dataset.path is required: the ImageFolder root (class folders)")
        check_settings(
            "dataset",
            self,
            [
                ("held_out_file", self.held_out_file is None, "null (users are generated)"),
                ("image_size", self.image_size >= 1, "an integer >= 1"),
                ("resize_size", self.resize_size is None or self.resize_size >= 1, ">= 1 (or null)"),
                ("images_per_user", self.images_per_user >= max(2, self.min_images), ">= min_images and 2"),
                ("popularity_sigma", self.popularity_sigma > 0, "> 0"),
                ("num_global_users", self.num_global_users >= 1, "an integer >= 1"),
                ("user_pool_fraction", 0 < self.user_pool_fraction <= 1, "in (0, 1]"),
            ],
        )


CONFIG_CLASSES: dict[str, type[CommonConfig]] = {
    "synthetic": SyntheticConfig,
    "femnist_hub": FemnistHubConfig,
    "femnist_leaf": FemnistLeafConfig,
    "imagenet_folder": ImageNetFolderConfig,
}
SOURCE_OF = {config_class: source for source, config_class in CONFIG_CLASSES.items()}


def parse_config(cfg: Mapping | CommonConfig) -> CommonConfig:
    """The dataclass a mapping describes; SettingsError (one line naming the key) on an unknown
    source or key, a value of the wrong type, or a value out of range."""
    if isinstance(cfg, CommonConfig):
        return cfg
    if not isinstance(cfg, Mapping):
        raise SettingsError(f"dataset config must be a mapping, got {type(cfg).__name__}")
    source = cfg.get("source", CommonConfig.source)
    if source not in CONFIG_CLASSES:
        raise SettingsError(f"dataset.source must be one of {sorted(CONFIG_CLASSES)}, got {source!r}")
    try:
        node = OmegaConf.merge(OmegaConf.structured(CONFIG_CLASSES[source]), cfg)
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as error:
        raise SettingsError(config_error_line(error, prefix="dataset.")) from None


def default_cache_dir() -> str:
    """The data cache shared by notebooks and `python -m fedexits.simulate`."""
    return os.path.join(os.environ.get("FEDEXITS_CACHE_DIR", "~/.cache/fedexits"), "data")


def config_defaults(source: str) -> dict[str, Any]:
    """Default values of every key of one source (handy for writing YAMLs and reports)."""
    return OmegaConf.to_container(OmegaConf.structured(CONFIG_CLASSES[source])) | {"source": source}
