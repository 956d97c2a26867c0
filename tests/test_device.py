"""The `device` setting: resolution, clear errors, and the engine following the model's device.

This machine has no GPU: the plumbing is checked on the CPU and on PyTorch's `meta` device
(tensors with shapes but no data), where mixing devices fails exactly as it would on a GPU.
"""

import pytest
import torch
from torch.utils.data import TensorDataset

from fedexits.engine import TrainConfig, resolve_device, train_global
from fedexits.engine.features import FrozenFeatures
from fedexits.errors import SettingsError
from fedexits.models import build_multi_exit

from .conftest import make_user


def small(seed=0):
    return build_multi_exit(backbone="femnist_mobilenet_v2", width_mult=0.25, num_exits=2, seed=seed)


def test_cpu_and_auto_without_a_gpu_resolve_to_the_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_a_missing_gpu_is_one_line(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        SettingsError, match=rf"^device {name}: no such CUDA device \(torch sees 0 GPU\(s\) here\)$"
    ):
        resolve_device(name)


def test_gpu_names_resolve_when_gpus_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(SettingsError, match="cuda:2: no such CUDA device"):
        resolve_device("cuda:2")
    with pytest.raises(SettingsError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        resolve_device("gpu")


def test_auto_in_a_ray_worker_without_an_assigned_gpu_stays_on_the_cpu(monkeypatch):
    """Ray hides nothing from an actor with num_gpus=0 here (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO
    is off), so `auto` must ask Ray which GPUs this client was given."""
    from fedexits.engine import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device, "_ray_gpu_ids", lambda: [])
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(device, "_ray_gpu_ids", lambda: [3])
    assert resolve_device("auto") == torch.device("cuda")


def test_training_on_an_explicit_device_moves_model_and_batches():
    x, y = make_user(n=64, seed=1)
    config = TrainConfig(epochs=1, batch_size=32, lr=0.01)
    a, b = small(), small()
    train_global(a, TensorDataset(x, y), config, progress=False)
    train_global(b, TensorDataset(x, y), config, progress=False, device="cpu")
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    # On `meta`, a whole forward, backward and optimiser step runs before the first number is
    # read back: only if the model and every batch moved (a CPU batch would be refused).
    meta = small()
    with pytest.raises(RuntimeError, match=r"item\(\) cannot be called on meta tensors"):
        train_global(meta, TensorDataset(x, y), config, progress=False, device="meta")
    assert next(meta.parameters()).device.type == "meta"


def test_personalisation_and_evaluation_follow_the_model_s_device():
    from fedexits.engine import PersonalisationConfig, exit_probabilities, finetune_full, personalise

    x, y = make_user(n=24, seed=3)
    model = small().to("meta").eval()
    with pytest.raises(RuntimeError, match=r"item\(\) cannot be called on meta tensors"):
        personalise(model, x, y, config=PersonalisationConfig(epochs=1, guard=False))
    with pytest.raises(RuntimeError, match="register_meta function for torch.nonzero"):
        finetune_full(model, x, y, config=PersonalisationConfig(epochs=1))  # x[labelled] on meta
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        exit_probabilities(model, x)  # computed on the model's device, returned on the CPU


def test_cached_features_live_on_the_model_s_device():
    """CPU images and a model elsewhere: the cache moves the images (a CPU tensor reaching a
    `meta` convolution raises a device mismatch, as it would on a GPU)."""
    model = small().to("meta").eval()
    x, _ = make_user(n=8, seed=2)
    features = FrozenFeatures(model, x)
    assert features.x.device.type == "meta"
    assert all(f.device.type == "meta" for f in features.cached_features.values())
    with pytest.raises(RuntimeError):
        model.exits[0](x[:1])  # without the move: refused
