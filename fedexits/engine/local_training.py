"""A client's share of a federated round: train the exits on its own labelled images, the backbone
and final classifier frozen (as in personalisation), from frozen-backbone features.

The features come in as a `FrozenFeatures`, so the caller decides how often the backbone runs: once
per call (today's personalisation), or once per client for a whole run, since the backbone never
changes between rounds (`FeatureStore`). The update is the same either way. FedProx's proximal term
(mu/2 * ||w - w_round||^2 over the exit parameters; Li et al., 2020) is added here, on the client,
where FedProx puts it; the server side of FedProx is plain FedAvg.

    features = FrozenFeatures(model, x)
    losses = train_exits_locally(model, features, y, LocalTrainingConfig(epochs=5, lr=0.05))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserDataError, check_settings
from .features import FrozenFeatures
from .losses import ExitLossWeights, exit_loss
from .personalise import batch_bounds, make_optimizer, to_model_device

LABELS_ONLY = ExitLossWeights(alpha=1.0, beta=0.0, gamma=0.0)


@dataclass
class LocalTrainingConfig:
    """One client's exit training in one round (labels only, no guard, no validation split)."""

    epochs: int = 1
    lr: float = 0.01
    batch_size: int = 32
    proximal_mu: float = 0.0  # FedProx: 0 is FedAvg's local objective
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0  # the order of the samples in every epoch

    def __post_init__(self):
        check_settings(
            "local training",
            self,
            [
                ("epochs", self.epochs >= 1, "an integer >= 1"),
                ("lr", self.lr > 0, "> 0"),
                ("batch_size", self.batch_size >= 2, "an integer >= 2"),
                ("proximal_mu", self.proximal_mu >= 0, ">= 0"),
                ("optimizer", self.optimizer in ("sgd", "adam"), "'sgd' or 'adam'"),
                ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ],
        )


def proximal_term(params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's mu/2 * ||w - w_round||^2 summed over all exit parameters."""
    return 0.5 * mu * sum((p - a).pow(2).sum() for p, a in zip(params, anchor))


def train_exits_locally(
    model, features: FrozenFeatures, y: torch.Tensor, config: LocalTrainingConfig
) -> list[float]:
    """Train `model`'s exits in place on `features` (of the images whose labels are `y`) for
    `config.epochs` epochs; returns each epoch's mean loss (proximal term included).

    BatchNorm in the exits trains (batch statistics, running averages updated); the backbone
    stays in eval mode. Same features, labels and seed give the same update, whether the features
    were computed for this call or kept from an earlier round.
    """
    if len(y) < 2:
        raise UserDataError(f"client has {len(y)} image(s); local training needs at least 2")
    if len(features.x) != len(y):
        raise ValueError(f"{len(features.x)} feature rows but {len(y)} labels")
    model.eval()  # frozen backbone: its BatchNorm statistics must not move
    params = model.exit_parameters()
    anchor = [p.detach().clone() for p in params] if config.proximal_mu > 0 else None
    optimizer = make_optimizer(params, config)
    generator = torch.Generator().manual_seed(config.seed)
    bounds = batch_bounds(len(y), config.batch_size)
    (y,) = to_model_device(model, y)
    labelled = torch.ones(len(y), dtype=torch.bool, device=y.device)
    epoch_losses = []
    for _ in range(config.epochs):
        model.exits.train()
        total, batches = 0.0, 0
        order = torch.randperm(len(y), generator=generator).to(y.device)
        for idx, batch_features, final_logits in features.epoch(order, bounds):
            logits = model.heads_forward(batch_features)
            loss = sum(exit_loss(z, final_logits, y[idx], labelled[idx], LABELS_ONLY) for z in logits)
            if anchor is not None:
                loss = loss + proximal_term(params, anchor, config.proximal_mu)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        epoch_losses.append(total / max(batches, 1))
    model.exits.eval()
    return epoch_losses
