import os

import pytest
import torch
from torch.utils.data import TensorDataset

from fedexits.engine import TrainConfig, train_global
from fedexits.models import build_multi_exit

_PRETRAINED: dict[int, dict] = {}

# The suite's numeric margins must hold whatever the thread count (reduction order changes the
# low bits): FEDEXITS_TEST_THREADS=1 / 2 runs it under either.
if os.environ.get("FEDEXITS_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["FEDEXITS_TEST_THREADS"]))


def make_user(n: int = 40, seed: int = 0, shift: int = 0):
    """Images whose class (0..7) is readable from a bright square's position. `shift` relabels
    the positions (label -> label + shift mod 8): a user whose labels the global model gets
    wrong, which only personalisation can fix."""
    g = torch.Generator().manual_seed(seed)
    position = torch.randint(0, 8, (n,), generator=g)
    x = 0.2 * torch.rand(n, 1, 28, 28, generator=g)
    for i, p in enumerate(position.tolist()):
        r, c = divmod(p, 4)
        x[i, 0, 3 + 12 * r : 13 + 12 * r, 1 + 7 * c : 7 + 7 * c] += 0.8
    return x, (position + shift) % 8


def make_tiny_model(num_exits: int = 4, seed: int = 0, pretrained: bool = True):
    """28x28 MobileNetV2 at width 0.25 with `num_exits` exits, jointly pretrained (once per
    session) on `make_user` data so that its features are meaningful."""
    torch.manual_seed(seed)
    model = build_multi_exit(backbone="femnist_mobilenet_v2", width_mult=0.25, num_exits=num_exits)
    if pretrained:
        if num_exits not in _PRETRAINED:
            x, y = make_user(n=768, seed=123)
            train_global(
                model, TensorDataset(x, y), TrainConfig(epochs=3, batch_size=64, lr=0.05), progress=False
            )
            _PRETRAINED[num_exits] = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(_PRETRAINED[num_exits])
    return model.eval()


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture
def user():
    return make_user()
