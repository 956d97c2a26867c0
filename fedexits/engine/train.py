"""Global training of a multi-exit network.

- `joint`: every weight trains with the Shallow-Deep Networks loss (final CE plus exit CEs whose
  weights ramp up to caps spread over the exits).
- `exits_only`: a pretrained backbone stays frozen and only the exit heads train.
- `exits_and_classifier`: as `exits_only`, and the final classifier trains too (a pretrained
  backbone given a new task head).

Checkpoints are written atomically after every epoch together with the config that made them, so
an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset

from ..errors import CheckpointError, DataError, check_settings
from .checkpoint import check_architecture, read_checkpoint, save_checkpoint
from .device import module_device
from .losses import sdn_exit_weights, sdn_loss

log = logging.getLogger(__name__)


MODES = ("joint", "exits_only", "exits_and_classifier")


@dataclass
class TrainConfig:
    """Central training of the global multi-exit model. The defaults train the 28x28 MobileNetV2
    from scratch on FEMNIST-like data (the command line's `global_training=femnist`)."""

    mode: str = "joint"  # "joint", "exits_only" or "exits_and_classifier"
    epochs: int = 3
    batch_size: int = 128
    optimizer: str = "sgd"  # "sgd" or "adam"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0  # the order of the samples (the study seeds the initial weights with it too)

    def __post_init__(self):
        check_settings(
            "global_training",
            self,
            [
                ("mode", self.mode in MODES, "one of " + ", ".join(MODES)),
                ("epochs", self.epochs >= 1, "an integer >= 1"),
                ("batch_size", self.batch_size >= 2, "an integer >= 2"),
                ("optimizer", self.optimizer in ("sgd", "adam"), "'sgd' or 'adam'"),
                ("lr", self.lr > 0, "> 0"),
                ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ],
        )


# Named settings (the command line's `global_training=NAME`): changes to the defaults above.
TRAIN_PRESETS: dict[str, dict] = {
    "femnist": {},
    # A pretrained backbone stays frozen; only the exits train (ImageNet backbones).
    "pretrained": dict(mode="exits_only", epochs=2, batch_size=64, lr=0.05, weight_decay=1e-4),
}


def _optimizer(params, config: TrainConfig):
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
    )


def _lr_at(config: TrainConfig, step: int, total: int) -> float:
    """Cosine decay over all steps."""
    return 0.5 * config.lr * (1 + math.cos(math.pi * step / total))


def train_global(
    model,
    dataset: Dataset,
    config: TrainConfig | None = None,
    checkpoint_path: str | Path | None = None,
    progress: bool = True,
    extra: dict | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """Train `model` in place (on `device`, or where it is); returns the history (loss per
    epoch, seconds).

    With `checkpoint_path`, an existing checkpoint made with the same config and architecture is
    resumed (or returned as is when complete); one made with another config is refused.
    `extra` (plain data) is stored in the checkpoint, e.g. the data config that made it.
    """
    config = config or TrainConfig()
    extra = extra or {}
    if device is not None:
        model.to(device)
    device = module_device(model)
    if len(dataset) < 2:
        raise DataError(f"global training set has {len(dataset)} samples; need at least 2")
    history = {"epoch_loss": [], "seconds": 0.0}
    params = {
        "joint": lambda: list(model.parameters()),
        "exits_only": model.exit_parameters,
        "exits_and_classifier": lambda: model.exit_parameters() + list(model.classifier.parameters()),
    }[config.mode]()
    optimizer = _optimizer(params, config)
    start_epoch = 0
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        checkpoint = read_checkpoint(checkpoint_path)
        check_architecture(checkpoint_path, checkpoint, model.spec)
        if checkpoint.get("train_config") != asdict(config) or checkpoint.get("extra") != extra:
            raise CheckpointError(
                f"checkpoint {checkpoint_path} was made with another training or data config; "
                "delete it or choose another path"
            )
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])  # moves its state to the parameters' device
        history = checkpoint["history"]
        start_epoch = checkpoint["epoch"]
    drop_last = len(dataset) > config.batch_size
    steps_per_epoch = len(dataset) // config.batch_size if drop_last else 1
    total_steps = config.epochs * steps_per_epoch
    if start_epoch >= config.epochs:
        log.info("global model %s is complete (%d epochs); reusing it", checkpoint_path, start_epoch)
        model.eval()
        return history
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(
            "global training", total=total_steps, completed=start_epoch * steps_per_epoch, loss=float("nan")
        )
        for epoch in range(start_epoch, config.epochs):
            # Per-epoch seeds: a resumed run shuffles exactly like an uninterrupted one.
            torch.manual_seed(config.seed * 10_000 + epoch)
            order = torch.randperm(len(dataset)).tolist()
            loader = DataLoader(dataset, batch_size=config.batch_size, sampler=order, drop_last=drop_last)
            started = time.perf_counter()
            total, batches = 0.0, 0
            _set_train_mode(model, config.mode)
            for i, (x, y) in enumerate(loader):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                step = epoch * steps_per_epoch + i
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(config, step, total_steps)
                loss = _step_loss(model, x, y, config.mode, step / total_steps)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, batches = total + loss.item(), batches + 1
                bar.update(task, advance=1, loss=total / batches)
            history["epoch_loss"].append(total / max(batches, 1))
            history["seconds"] += time.perf_counter() - started
            # what made the weights: another torch, thread count or CPU kernel set (AVX2, AVX512)
            # trains slightly other weights, and every result downstream moves with them
            cpu = torch.backends.cpu.get_cpu_capability()
            made_with = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}"
            history["made_with"] = sorted({*history.get("made_with", []), made_with})
            log.info(
                "global training epoch %d/%d: loss %.4f (%.0f s)",
                epoch + 1,
                config.epochs,
                history["epoch_loss"][-1],
                time.perf_counter() - started,
            )
            if checkpoint_path is not None:
                save_checkpoint(
                    checkpoint_path,
                    model,
                    train_config=asdict(config),
                    extra=extra,
                    epoch=epoch + 1,
                    optimizer=optimizer.state_dict(),
                    history=history,
                )
    model.eval()
    return history


def _set_train_mode(model, mode: str) -> None:
    if mode == "joint":
        model.train()
        return
    model.eval()  # frozen backbone, BatchNorm statistics included
    model.exits.train()
    if mode == "exits_and_classifier":
        model.classifier.train()


def _step_loss(model, x, y, mode: str, progress: float) -> torch.Tensor:
    if mode == "joint":
        return sdn_loss(model(x), y, sdn_exit_weights(model.num_exits, progress))
    with torch.no_grad():
        features = model.attach_point_features(x)
    last = features.pop()
    loss = sum(F.cross_entropy(head(f), y) for head, f in zip(model.exits, features))
    if mode == "exits_and_classifier":
        loss = loss + F.cross_entropy(model.classifier(last), y)
    return loss
