"""Which device the engine computes on.

The engine follows PyTorch's idiom: the caller puts the model on a device (`model.to(device)`)
and every engine function moves its inputs to the model's device and returns results that the
study aggregates on the CPU. `resolve_device` turns the `device` setting into a torch.device:

- "cpu": the CPU (what every number in the README was measured on; deterministic per seed).
- "cuda" / "cuda:N": that GPU; a missing device is a SettingsError, before any work.
- "auto": the GPU that Ray gave this process (a virtual client with `simulation.client_gpus > 0`
  sees only its own GPU, as cuda:0), or outside Ray the first GPU if there is one, else the CPU.

On a GPU, cuDNN's autotuner is switched off and deterministic kernels are preferred, so a run is
repeatable on the same GPU; results still differ from the CPU's in the last bits (different
kernels), which can move a threshold choice or a guard decision for a few users.
"""

from __future__ import annotations

import os
import re

import torch

from ..errors import SettingsError
from ..models.costs import module_device  # noqa: F401 (the engine's one definition, re-exported)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _ray_gpu_ids() -> list | None:
    """The GPUs Ray assigned to this worker process, or None outside a Ray worker."""
    if "RAY_RAYLET_PID" not in os.environ:  # set in every Ray worker process
        return None
    try:
        import ray

        return list(ray.get_gpu_ids()) if ray.is_initialized() else None
    except Exception:  # an unusual Ray state: fall back to CUDA's own view
        return None


def check_device_name(name: str) -> None:
    if not DEVICE_PATTERN.match(name):
        raise SettingsError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch.device for a `device` setting (see the module docstring)."""
    check_device_name(name)
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        gpus = _ray_gpu_ids()
        use_gpu = torch.cuda.is_available() and (gpus is None or len(gpus) > 0)
        return _cuda(torch.device("cuda")) if use_gpu else torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= count:
        raise SettingsError(f"device {name}: no such CUDA device (torch sees {count} GPU(s) here)")
    return _cuda(torch.device(name))


def _cuda(device: torch.device) -> torch.device:
    torch.backends.cudnn.benchmark = False  # autotuning picks kernels by timing: not repeatable
    torch.backends.cudnn.deterministic = True
    return device
