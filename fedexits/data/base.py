"""The contract between data sources and the rest of fedexits.

A *population* is what a simulation needs: a pool of images that trains the global model, a list
of users that take part in federated rounds (the global population) and a list of held-out users
that are personalised one by one. Every source (synthetic, FEMNIST hub, FEMNIST LEAF, ImageNet
folder) implements `Population`; the engine and the Flower apps only see this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from fedexits.errors import DataError, UserDataError  # noqa: F401 (re-exported)


@dataclass
class UserData:
    """One user's data, model-ready (float32 tensors, normalised the way the model expects)."""

    user_id: str
    train_x: torch.Tensor  # (N, C, H, W) float32: personalisation split
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor  # (K, C, H, W) float32: held-out test split
    test_y: torch.Tensor  # (K,) int64
    labelled: torch.Tensor  # (N,) bool: which personalisation samples carry labels
    notes: list[str] = field(default_factory=list)  # e.g. "only 120 images: held out 50% for test"

    @property
    def n_train(self) -> int:
        return int(self.train_y.numel())

    @property
    def n_test(self) -> int:
        return int(self.test_y.numel())

    @property
    def n_labelled(self) -> int:
        return int(self.labelled.sum())


class Population(ABC):
    """A population of users built from one data source.

    Construction from an existing cache must be cheap (an index file plus memory-mapped arrays),
    because every Flower client process builds its own `Population` from the same config.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of model-ready images
    global_users: list[str]  # their data forms the global pool; also the federated clients
    held_out_users: list[str]  # personalised separately; never in the global pool

    @abstractmethod
    def global_train_set(self) -> Dataset:
        """Dataset of (x float32 (C,H,W), y int) over all global users' images."""

    @abstractmethod
    def load_user(self, user_id: str, label_fraction: float = 1.0, seed: int = 0) -> UserData:
        """Split one user (global or held out) into personalisation and test data.

        `label_fraction` of the personalisation samples (chosen with `seed`) are labelled.
        Raises DataError for an unknown user or one with too few images to split.
        """

    def stream_pool(self, user_id: str) -> tuple[np.ndarray, np.ndarray]:
        """All of one user's images as a device stores them, uint8 (N, C, H, W), and labels
        (int64): what a lifelong stream (`fedexits.data.streams`) draws its arrivals from."""
        raise DataError(f"data source {self.name} does not provide user streams")

    def model_input(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, C, H, W) images from `stream_pool` -> the float32 tensor the model sees."""
        raise DataError(f"data source {self.name} does not provide user streams")

    def describe(self) -> dict:
        """Small JSON-able summary for reports (sizes, sources, settings)."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "global_users": len(self.global_users),
            "held_out_users": len(self.held_out_users),
        }
