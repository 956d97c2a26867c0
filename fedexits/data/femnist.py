"""The population behind every FEMNIST-like source (synthetic, LEAF, hub): a view on an ImageCache.

Images are stored uint8 with ink bright; the model sees float32 = uint8 / 255 (background 0, ink
1) with shape (1, 28, 28) and no mean/std normalisation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from fedexits.data.base import Population, UserData, UserDataError
from fedexits.data.cache import ImageCache
from fedexits.data.config import CommonConfig
from fedexits.data.split import choose_held_out, labelled_mask, split_user, too_few_images

FEMNIST_CLASSES = 62


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1], ink bright."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).unsqueeze(1)


class CachedImageDataset(Dataset):
    """(x float32 (1, 28, 28), y int) over chosen rows of a cache, read from the memory map.

    `images`, `labels` and `rows` are public for fast bulk access (e.g. images[rows[a:b]]).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray):
        self.images = images
        self.labels = labels
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.rows[index]
        return to_model_input(self.images[row][None])[0], int(self.labels[row])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Batched read used by DataLoader: one fancy-indexed memmap read per batch."""
        rows = self.rows[np.asarray(indices)]
        x = to_model_input(self.images[rows])
        y = self.labels[rows].tolist()
        return list(zip(x, y))

    @property
    def targets(self) -> np.ndarray:
        return np.asarray(self.labels[self.rows], dtype=np.int64)


class CachedPopulation(Population):
    """Users are the cache's users; held-out ones are chosen by `choose_held_out`."""

    num_classes = FEMNIST_CLASSES
    input_shape = (1, 28, 28)

    def __init__(self, name: str, cache: ImageCache, cfg: CommonConfig):
        self.name = name
        self.cache = cache
        self.cfg = cfg
        self.user_counts = {user: count for user, (_, count) in cache.users.items()}
        self.global_users, self.held_out_users, self.dropped_users = choose_held_out(self.user_counts, cfg)

    def global_train_set(self) -> CachedImageDataset:
        ranges = [np.arange(*self._bounds(user)) for user in self.global_users]
        return CachedImageDataset(self.cache.images, self.cache.labels, np.concatenate(ranges))

    def _bounds(self, user: str) -> tuple[int, int]:
        start, count = self.cache.users[user]
        return start, start + count

    def user_images(self, user: str) -> tuple[np.ndarray, np.ndarray]:
        """All of a user's images (uint8, ink bright) and labels, straight from the cache."""
        self._check_user(user)
        rows = self.cache.user_slice(user)
        return np.array(self.cache.images[rows]), np.array(self.cache.labels[rows], np.int64)

    def _check_user(self, user: str) -> None:
        if user not in self.cache.users:
            raise UserDataError(f"unknown user {user!r}: {self.name} has {len(self.cache.users)} users")
        if self.user_counts[user] < self.cfg.min_images:
            raise too_few_images(user, self.user_counts[user], self.cfg.min_images)

    def load_user(self, user_id: str, label_fraction: float = 1.0, seed: int = 0) -> UserData:
        images, labels = self.user_images(user_id)
        train_rows, test_rows, notes = split_user(user_id, len(labels), self.cfg)
        return UserData(
            user_id=user_id,
            train_x=to_model_input(images[train_rows]),
            train_y=torch.from_numpy(labels[train_rows]),
            test_x=to_model_input(images[test_rows]),
            test_y=torch.from_numpy(labels[test_rows]),
            labelled=labelled_mask(user_id, len(train_rows), label_fraction, seed),
            notes=notes,
        )

    def describe(self) -> dict:
        counts = np.array([self.user_counts[user] for user in self.global_users + self.held_out_users])
        return super().describe() | {
            "source": self.cfg.source,
            "cache": self.cache.path,
            "num_images": len(self.cache.labels),
            "dropped_users": len(self.dropped_users),
            "images_per_user_mean": round(float(counts.mean()), 1),
            "images_per_user_sd": round(float(counts.std()), 1),
            "n_test": self.cfg.n_test,
            "seed": self.cfg.seed,
            "settings": self.cache.settings,
        }
