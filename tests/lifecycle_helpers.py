"""A tiny in-memory population for lifecycle tests: the bright-square images of conftest.make_user,
with a per-user class skew and pixel-noise level (its "style")."""

from __future__ import annotations

import numpy as np
import torch

from fedexits.data.base import Population


def square_images(rng: np.random.Generator, labels: np.ndarray, noise: float) -> np.ndarray:
    """uint8 (n, 1, 28, 28): class k is a bright square at position k (as in make_user)."""
    x = noise * rng.random((len(labels), 1, 28, 28))
    for i, p in enumerate(labels.tolist()):
        r, c = divmod(p, 4)
        x[i, 0, 3 + 12 * r : 13 + 12 * r, 1 + 7 * c : 7 + 7 * c] += 0.8
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


class SquaresPopulation(Population):
    """Users u0..u{n-1}: `images` each, 80% of them from two popular classes (2i, 2i+1 mod 8),
    background noise 0.2; `noisy` users have noise 0.7 (a very different "writer")."""

    name = "squares"
    num_classes = 62
    input_shape = (1, 28, 28)

    def __init__(self, num_users: int = 4, images: int = 120, noisy: tuple[str, ...] = (), seed: int = 0):
        self.held_out_users = [f"u{i}" for i in range(num_users)]
        self.global_users = []
        self.pools = {}
        for i, user in enumerate(self.held_out_users):
            rng = np.random.default_rng([seed, i])
            popular = rng.random(images) < 0.8
            labels = np.where(popular, (2 * i + rng.integers(0, 2, images)) % 8, rng.integers(0, 8, images))
            noise = 0.7 if user in noisy else 0.2
            self.pools[user] = (square_images(rng, labels, noise), labels.astype(np.int64))

    def global_train_set(self):
        raise NotImplementedError

    def load_user(self, user_id, label_fraction=1.0, seed=0):
        raise NotImplementedError

    def stream_pool(self, user_id):
        images, labels = self.pools[user_id]
        return images.copy(), labels.copy()

    def model_input(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images.astype(np.float32) / 255.0)


def square_dataset(n: int, seed: int, noise: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 8, n)
    return torch.from_numpy(square_images(rng, labels, noise).astype(np.float32) / 255.0), torch.from_numpy(
        labels
    )


_MICRO: dict[str, torch.Tensor] = {}


def make_micro_model():
    """A four-block CNN with three small exits, trained jointly (once per session, ~2 s) on
    square images: its final exit is right on clean squares, so exits can be judged against it."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from fedexits.engine import TrainConfig, train_global
    from fedexits.models import ExitHead, MultiExitNetwork

    def block(c_in, c_out, stride):
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
        )

    torch.manual_seed(0)
    blocks = [block(1, 8, 2), block(8, 16, 2), block(16, 16, 1), block(16, 32, 2)]
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 62))
    heads = [
        ExitHead(8, 62, 14, channels=8),
        ExitHead(16, 62, 7, channels=8),
        ExitHead(16, 62, 7, channels=8),
    ]
    model = MultiExitNetwork(blocks, classifier, heads, (0, 1, 2), (1, 28, 28))
    if not _MICRO:
        x, y = square_dataset(1024, seed=123)
        train_global(
            model, TensorDataset(x, y), TrainConfig(epochs=4, batch_size=32, lr=0.05), progress=False
        )
        _MICRO.update({k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(_MICRO)
    return model.eval()
