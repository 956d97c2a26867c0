"""Personalised ImageNet from a torchvision ImageFolder tree (paper section 4.1).

Each held-out user has a Gaussian label popularity over the class indices: a random centre, width
`popularity_sigma`, circular distance (the class order wraps around), so nearby classes are
frequent and far ones rare. A user's images are drawn from the user pool (val/) with those class
frequencies, without duplicates within a user (different users may share images). The global
model's pool is the training set (train/), split into IID shards for the federated global users.

Scanning a big tree takes long, so the file list is cached (keyed by the root path, refreshed
when a class folder changes) and each client process only reads that list.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, find_classes, make_dataset

from fedexits.data.base import DataError, Population, UserData, UserDataError
from fedexits.data.cache import CacheInvalid, build_once, cache_name
from fedexits.data.config import ImageNetFolderConfig
from fedexits.data.split import labelled_mask, rng_for, split_user

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INDEX_FORMAT = 1


def scan_image_folder(root: str) -> tuple[list[str], list[str], np.ndarray]:
    """(classes, relative image paths, targets) of one ImageFolder root, with clear errors."""
    try:
        classes, class_to_idx = find_classes(root)
    except FileNotFoundError:
        raise DataError(
            f"no class folders in {root}; expected ImageFolder layout {root}/<class>/<image>"
        ) from None
    samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    targets = np.array([target for _, target in samples], dtype=np.int64)
    counts = np.bincount(targets, minlength=len(classes))
    if (counts == 0).any():
        empty = classes[int(np.flatnonzero(counts == 0)[0])]
        raise DataError(
            f"class folder {os.path.join(root, empty)} has no images ({', '.join(IMG_EXTENSIONS[:4])}, ...)"
        )
    return classes, [os.path.relpath(path, root) for path, _ in samples], targets


def _layout(root: str) -> dict[str, str]:
    if not os.path.isdir(root):
        raise DataError(f"ImageFolder path {root} does not exist or is not a folder")
    train, val = os.path.join(root, "train"), os.path.join(root, "val")
    if os.path.isdir(train) and os.path.isdir(val):
        return {"train": train, "val": val}
    return {"all": root}


def _fingerprint(layout: dict[str, str]) -> list:
    """Class folder names and mtimes: adding or removing an image changes its folder's mtime."""
    entries = []
    for split, folder in layout.items():
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_dir():
                entries.append([split, entry.name, entry.stat().st_mtime_ns])
    return entries


class FolderIndex:
    """The cached file list: classes, and per split (train/val or all) paths and targets."""

    def __init__(self, path: str, index: dict):
        self.path = path
        self.classes: list[str] = index["classes"]
        self.roots: dict[str, str] = index["roots"]
        self._targets: dict[str, np.ndarray] = {}
        self._paths: dict[str, list[str]] = {}

    @classmethod
    def open(cls, path: str, settings: dict, fingerprint: list) -> FolderIndex:
        try:
            with open(os.path.join(path, "index.json")) as f:
                index = json.load(f)
        except FileNotFoundError:
            raise CacheInvalid(f"{path} has no index.json") from None
        except (OSError, ValueError) as error:
            raise CacheInvalid(f"unreadable {path}/index.json: {error}") from None
        if index.get("format") != INDEX_FORMAT or index.get("settings") != settings:
            raise CacheInvalid(f"{path}/index.json was built with other settings")
        if index.get("fingerprint") != fingerprint:
            raise CacheInvalid(f"{path} is stale: class folders under {settings['path']} changed")
        folder = cls(path, index)
        for split, count in index["counts"].items():
            if len(folder.targets(split)) != count:
                raise CacheInvalid(f"damaged cache {path}: {split} targets do not match index.json")
        return folder

    def targets(self, split: str) -> np.ndarray:
        if split not in self._targets:
            try:
                self._targets[split] = np.load(os.path.join(self.path, f"{split}_targets.npy"))
            except (OSError, ValueError) as error:
                raise CacheInvalid(f"damaged cache {self.path}: {error}") from None
        return self._targets[split]

    def paths(self, split: str) -> list[str]:
        if split not in self._paths:
            with open(os.path.join(self.path, f"{split}_paths.txt")) as f:
                self._paths[split] = f.read().split("\n")
            if len(self._paths[split]) != len(self.targets(split)):
                raise DataError(f"damaged cache {self.path}: delete it to rebuild")
        return self._paths[split]


def folder_index(root: str, cache_dir: str) -> FolderIndex:
    root = os.path.abspath(os.path.expanduser(root))
    layout = _layout(root)
    settings = {"source": "imagenet_folder", "path": root}
    fingerprint = _fingerprint(layout)

    def build_into(directory: str) -> None:
        scans = {split: scan_image_folder(folder) for split, folder in layout.items()}
        classes = next(iter(scans.values()))[0]
        for split, (split_classes, _, _) in scans.items():
            if split_classes != classes:
                raise DataError(
                    f"class folders of {layout[split]} differ from those of "
                    f"{layout['train']}; expected the same classes"
                )
        for split, (_, paths, targets) in scans.items():
            np.save(os.path.join(directory, f"{split}_targets.npy"), targets)
            with open(os.path.join(directory, f"{split}_paths.txt"), "w") as f:
                f.write("\n".join(paths))
        index = {
            "format": INDEX_FORMAT,
            "settings": settings,
            "fingerprint": fingerprint,
            "classes": classes,
            "roots": layout,
            "counts": {split: len(scan[1]) for split, scan in scans.items()},
        }
        with open(os.path.join(directory, "index.json"), "w") as f:
            json.dump(index, f)

    return build_once(
        cache_dir,
        cache_name("imagenet_folder", settings),
        lambda path: FolderIndex.open(path, settings, fingerprint),
        build_into,
    )


def gaussian_popularity(num_classes: int, centre: float, sigma: float) -> np.ndarray:
    """Class probabilities exp(-d^2 / 2 sigma^2), d the circular distance to the centre."""
    distance = np.abs(np.arange(num_classes) - centre)
    distance = np.minimum(distance, num_classes - distance)
    weights = np.exp(-(distance**2) / (2 * sigma**2))
    return weights / weights.sum()


class ListImageFolder(ImageFolder):
    """torchvision ImageFolder over a cached file list (no directory scan on construction)."""

    def __init__(self, root: str, classes: list[str], samples: list[tuple[str, int]], transform):
        self._cached_classes, self._cached_samples = classes, samples
        super().__init__(root, transform=transform)

    def find_classes(self, directory):
        return self._cached_classes, {name: i for i, name in enumerate(self._cached_classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return self._cached_samples


class ImageFolderPopulation(Population):
    name = "imagenet_folder"

    def __init__(self, cfg: ImageNetFolderConfig):
        self.cfg = cfg
        self.index = folder_index(cfg.path, cfg.cache_dir)
        self.num_classes = len(self.index.classes)
        self.input_shape = (3, cfg.image_size, cfg.image_size)
        resize = cfg.resize_size or round(cfg.image_size * 256 / 224)
        self.transform = transforms.Compose(
            [
                transforms.Resize(resize),
                transforms.CenterCrop(cfg.image_size),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        if "all" in self.index.roots:
            self._pools = self._split_single_folder()
        else:
            self._pools = {
                "user": ("val", np.arange(len(self.index.targets("val")))),
                "global": ("train", None),
            }
        self._sample_users()
        self.global_users = [f"global_{i:03d}" for i in range(cfg.num_global_users)]

    def _split_single_folder(self) -> dict[str, tuple[str, np.ndarray]]:
        """No train/val: a seeded user_pool_fraction of each class (at least one image) is the
        user pool, the rest the global pool."""
        targets = self.index.targets("all")
        order = rng_for(self.cfg.seed, "user-pool").permutation(len(targets))
        by_class = order[np.argsort(targets[order], kind="stable")]  # random order within class
        sizes = np.bincount(targets, minlength=self.num_classes)
        rank_in_class = np.arange(len(targets)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        quota = np.maximum(1, np.round(self.cfg.user_pool_fraction * sizes)).astype(np.int64)
        for_users = rank_in_class < np.repeat(quota, sizes)
        return {
            "user": ("all", np.sort(by_class[for_users])),
            "global": ("all", np.sort(by_class[~for_users])),
        }

    def _pool(self, which: str) -> tuple[str, np.ndarray]:
        split, positions = self._pools[which]
        if positions is None:
            positions = np.arange(len(self.index.targets(split)))
            self._pools[which] = (split, positions)
        return split, positions

    def _sample_users(self) -> None:
        cfg = self.cfg
        split, pool = self._pool("user")
        pool_targets = self.index.targets(split)[pool]
        if cfg.images_per_user > len(pool):
            raise DataError(
                f"images_per_user={cfg.images_per_user} but the user pool "
                f"({self.index.roots[split]}) has only {len(pool)} images"
            )
        class_sizes = np.bincount(pool_targets, minlength=self.num_classes)
        self.held_out_users = [f"user_{i:03d}" for i in range(cfg.num_held_out)]
        self.popularity_centres: dict[str, float] = {}
        self._user_rows: dict[str, tuple[str, np.ndarray]] = {}
        for user in self.held_out_users:
            rng = rng_for(cfg.seed, "imagenet-user", user)
            centre = float(rng.uniform(0, self.num_classes))
            popularity = gaussian_popularity(self.num_classes, centre, cfg.popularity_sigma)
            # weighted sampling without replacement (Gumbel top-k), in log space so that
            # far-away classes get tiny but valid weights: image weight = p(class) / class size
            log_weights = np.log(popularity[pool_targets] + 1e-300) - np.log(class_sizes[pool_targets])
            keys = log_weights + rng.gumbel(size=len(pool))
            chosen = np.argpartition(-keys, cfg.images_per_user - 1)[: cfg.images_per_user]
            self.popularity_centres[user] = centre
            self._user_rows[user] = (split, np.sort(pool[chosen]))

    def _global_shard(self, user: str) -> tuple[str, np.ndarray]:
        split, pool = self._pool("global")
        order = rng_for(self.cfg.seed, "global-shards").permutation(len(pool))
        shard = np.array_split(order, self.cfg.num_global_users)[self.global_users.index(user)]
        return split, np.sort(pool[shard])

    def _dataset(self, split: str, positions: np.ndarray) -> ListImageFolder:
        root, paths, targets = (
            self.index.roots[split],
            self.index.paths(split),
            self.index.targets(split),
        )
        samples = [(os.path.join(root, paths[i]), int(targets[i])) for i in positions]
        return ListImageFolder(root, self.index.classes, samples, self.transform)

    def global_train_set(self) -> ListImageFolder:
        return self._dataset(*self._pool("global"))

    def _load(self, dataset: ListImageFolder, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = []
        for i in indices:
            path, _ = dataset.samples[i]
            try:
                images.append(self.transform(default_loader(path)))
            except (OSError, ValueError) as error:
                raise UserDataError(f"unreadable image {path}: {error}") from None
        targets = torch.tensor([dataset.targets[i] for i in indices], dtype=torch.int64)
        empty = torch.empty(0, *self.input_shape)
        return (torch.stack(images) if images else empty), targets

    def load_user(self, user_id: str, label_fraction: float = 1.0, seed: int = 0) -> UserData:
        if user_id in self._user_rows:
            split, rows = self._user_rows[user_id]
        elif user_id in self.global_users:
            split, rows = self._global_shard(user_id)
        else:
            raise UserDataError(
                f"unknown user {user_id!r}: imagenet_folder has users user_000.."
                f"user_{len(self.held_out_users) - 1:03d} and global_000.."
            )
        train_rows, test_rows, notes = split_user(user_id, len(rows), self.cfg)
        labelled = labelled_mask(user_id, len(train_rows), label_fraction, seed)
        dataset = self._dataset(split, rows)
        train_x, train_y = self._load(dataset, train_rows)
        test_x, test_y = self._load(dataset, test_rows)
        return UserData(user_id, train_x, train_y, test_x, test_y, labelled, notes)

    def describe(self) -> dict:
        return super().describe() | {
            "source": "imagenet_folder",
            "path": self.cfg.path,
            "layout": "train/val" if "train" in self.index.roots else "single folder",
            "images_per_user": self.cfg.images_per_user,
            "popularity_sigma": self.cfg.popularity_sigma,
            "n_test": self.cfg.n_test,
            "seed": self.cfg.seed,
        }
