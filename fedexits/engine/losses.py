"""Losses: the paper's per-exit personalisation loss and the Shallow-Deep Networks training loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserDataError, check_settings


@dataclass(frozen=True)
class ExitLossWeights:
    """alpha: CE with labels; beta: distillation from the final exit at temperature T;
    gamma: CE with the final exit's top-1 as pseudo-label (paper Eq. 1)."""

    alpha: float = 1.0
    beta: float = 0.0
    gamma: float = 0.0
    temperature: float = 1.0

    def __post_init__(self):
        check_settings(  # `not x < 0` would let NaN through; these reject it
            "personalisation",
            self,
            [(name, getattr(self, name) >= 0, ">= 0") for name in ("alpha", "beta", "gamma")]
            + [("temperature", self.temperature > 0, "> 0")],
        )

    def check_active(self, n_labelled: int, n_unlabelled: int) -> None:
        """Reject settings where every term is zero for every sample: nothing would train."""
        active = self.beta > 0 or (self.alpha > 0 and n_labelled > 0) or (self.gamma > 0 and n_unlabelled > 0)
        if not active:
            raise UserDataError(
                f"loss is zero for every sample: alpha={self.alpha} with {n_labelled} labelled, "
                f"gamma={self.gamma} with {n_unlabelled} unlabelled samples, beta={self.beta}; "
                "set a weight that applies to this user's data"
            )


def exit_loss(
    exit_logits: torch.Tensor,
    final_logits: torch.Tensor,
    labels: torch.Tensor,
    labelled: torch.Tensor,
    weights: ExitLossWeights,
) -> torch.Tensor:
    """Loss of one exit, averaged over the batch.

    Labelled samples take the alpha term, unlabelled ones the gamma term (never both); the
    distillation term applies to every sample. `final_logits` must carry no gradient.
    """
    n = exit_logits.shape[0]
    loss = exit_logits.new_zeros(())
    n_labelled = int(labelled.sum())
    if weights.alpha > 0 and n_labelled:
        if n_labelled == n:  # the common case: skip the masked copies
            ce = F.cross_entropy(exit_logits, labels, reduction="sum")
        else:
            ce = F.cross_entropy(exit_logits[labelled], labels[labelled], reduction="sum")
        loss = loss + weights.alpha * ce / n
    if weights.gamma > 0 and n_labelled < n:
        unlabelled = ~labelled
        pseudo = final_logits[unlabelled].argmax(dim=1)
        ce = F.cross_entropy(exit_logits[unlabelled], pseudo, reduction="sum")
        loss = loss + weights.gamma * ce / n
    if weights.beta > 0:
        t = weights.temperature
        kl = F.kl_div(
            F.log_softmax(exit_logits / t, dim=1),
            F.log_softmax(final_logits / t, dim=1),
            reduction="sum",
            log_target=True,
        )
        loss = loss + weights.beta * t * t * kl / n
    return loss


def sdn_exit_weights(num_exits: int, progress: float) -> list[float]:
    """Shallow-Deep Networks (Kaya et al., 2019): exit i's weight grows linearly during training
    from 0.01 to its cap tau_i = (i+1)/(M+1), so early exits do not pull the backbone too soon.
    `progress` is the fraction of training done, in [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    caps = [(i + 1) / (num_exits + 1) for i in range(num_exits)]
    return [0.01 + (cap - 0.01) * progress for cap in caps]


def sdn_loss(
    logits: Sequence[torch.Tensor], labels: torch.Tensor, exit_weights: Sequence[float]
) -> torch.Tensor:
    """Final-exit CE plus weighted early-exit CEs."""
    loss = F.cross_entropy(logits[-1], labels)
    for w, z in zip(exit_weights, logits[:-1]):
        loss = loss + w * F.cross_entropy(z, labels)
    return loss
