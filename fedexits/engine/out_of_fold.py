"""Out-of-fold personalisation: exit outputs on every personalisation image from exits that did
not train on it, for the guard and for calibration; then the exits are personalised on all images.

A validation split keeps ~20% of a user's images out of training and still leaves the guard and
the threshold only 20-30 images to decide on. With k folds every image is held out once: the
exits are personalised k times on the other folds (the backbone's features are computed once for
all images, so each fold only trains the heads) and each image's outputs come from the fold model
that did not see it. The deployed exits are then trained on every image. The decisions are taken
on the fold models' outputs, which stand in for the deployed model's (trained on (k-1)/k of the
data, slightly weaker; folds share training data, so the outputs are not fully independent).
"""

from __future__ import annotations

import copy
import time
import zlib
from dataclasses import dataclass, field, replace

import torch

from ..errors import UserDataError, check_settings
from .features import FrozenFeatures
from .personalise import (
    PersonalisationConfig,
    PersonalisationResult,
    check_user_data,
    random_affine,
    to_model_device,
    train_exits,
)
from .risk_control import mcnemar_p_value, sign_flip_p_value

GUARD_TESTS = ("point", "paired")


@dataclass
class OutOfFoldConfig:
    """folds: k (>= 2). stratify: spread each class (label, or the final exit's top-1 where
    unlabelled) evenly over the folds. guard_test: "point" keeps an exit's personalised weights
    when the guard metric is better on the out-of-fold outputs at all (the validation-split
    guard's rule); "paired" only when a one-sided paired test says so at `guard_confidence`
    (accuracy: exact McNemar; cross-entropy: sign-flip randomisation test)."""

    folds: int = 5
    stratify: bool = True
    guard_test: str = "paired"
    # 0.9: on the tuning half of the real LEAF writers 4.7% of (user, exit) pairs were hurt,
    # against 7.3% at 0.8 (the issue allows 10%), for -0.4 pp of early-exit gain
    guard_confidence: float = 0.9

    def __post_init__(self):
        check_settings(
            "calibration.out_of_fold",
            self,
            [
                ("folds", isinstance(self.folds, int) and self.folds >= 2, "an integer >= 2"),
                ("guard_test", self.guard_test in GUARD_TESTS, f"one of {', '.join(GUARD_TESTS)}"),
                ("guard_confidence", 0 < self.guard_confidence < 1, "in (0, 1)"),
            ],
        )


@dataclass
class OutOfFoldResult:
    """`probs` (M+1, N, C) is what calibration uses: per early exit the out-of-fold personalised
    outputs where the guard kept the personalised weights and the shared exit's outputs where it
    did not (the shared exits never saw the user's data), the final exit last. `targets`: labels
    where labelled, else the final exit's top-1. The model's exits are the deployed ones."""

    probs: torch.Tensor = field(repr=False)
    targets: torch.Tensor = field(repr=False)
    personalised_probs: torch.Tensor = field(repr=False)  # out-of-fold, before the guard
    shared_probs: torch.Tensor = field(repr=False)  # the incoming exits, every image
    fold: torch.Tensor = field(repr=False)  # (N,) the fold each image was held out in
    guard_fired: list[bool]  # per early exit: the shared weights were kept
    guard_p_values: list[float]  # per early exit ("paired"; NaN for "point")
    personalisation: PersonalisationResult  # the deployed training, on every image
    seconds: dict[str, float]


def assign_folds(strata: torch.Tensor, folds: int, seed: int, stratify: bool = True) -> torch.Tensor:
    """(N,) fold index per sample: a seeded permutation dealt round-robin, after a stable sort
    by stratum when stratifying (each class is spread over the folds)."""
    order = torch.randperm(len(strata), generator=torch.Generator().manual_seed(seed))
    if stratify:
        order = order[torch.sort(strata[order], stable=True).indices]
    fold = torch.empty(len(strata), dtype=torch.long)
    fold[order] = torch.arange(len(strata)) % folds
    return fold


def fold_seed(seed: int, fold: int) -> int:
    """Training seed of fold `fold` (the deployed training uses `seed` itself)."""
    return zlib.crc32(f"{seed}/fold/{fold}".encode()) % 2**31


def per_sample_scores(probs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exits, N) correctness and cross-entropy of softmax outputs `probs` (exits, N, C)."""
    correct = probs.argmax(dim=-1) == targets
    picked = probs.gather(-1, targets.expand(probs.shape[0], -1)[..., None]).squeeze(-1)
    return correct, -torch.log(picked.double().clamp_min(1e-12))


def guard_decisions(
    personalised: torch.Tensor,
    shared: torch.Tensor,
    targets: torch.Tensor,
    metric: str = "cross_entropy",
    test: str = "paired",
    confidence: float = 0.8,
    seed: int = 0,
) -> tuple[list[bool], list[float]]:
    """Per exit: keep the personalised weights? (and the paired test's p-value). `personalised`
    and `shared` are (exits, N, C) outputs on the same held-out samples."""
    correct_new, loss_new = per_sample_scores(personalised, targets)
    correct_old, loss_old = per_sample_scores(shared, targets)
    keep, p_values = [], []
    for k in range(len(personalised)):
        if test == "point":
            acc_new, acc_old = correct_new[k].double().mean(), correct_old[k].double().mean()
            lower_loss = bool(loss_new[k].mean() < loss_old[k].mean())
            if metric == "accuracy":
                keep.append(bool(acc_new > acc_old) or (bool(acc_new == acc_old) and lower_loss))
            else:
                keep.append(lower_loss)
            p_values.append(float("nan"))
            continue
        if metric == "accuracy":
            wins = int((correct_new[k] & ~correct_old[k]).sum())
            p = mcnemar_p_value(wins, int((~correct_new[k] & correct_old[k]).sum()))
        else:
            p = sign_flip_p_value(loss_old[k] - loss_new[k], seed=fold_seed(seed, 1000 + k))
        keep.append(p <= 1 - confidence)
        p_values.append(p)
    return keep, p_values


def personalise_out_of_fold(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    labelled: torch.Tensor | None = None,
    config: PersonalisationConfig | None = None,
    out_of_fold: OutOfFoldConfig | None = None,
) -> OutOfFoldResult:
    """Personalise the model's exits in place on one user (every image), and return out-of-fold
    outputs and the guard's decisions (see the module docstring). `config.guard` False keeps
    every personalised exit; `config.val_fraction` is not used (no validation split)."""
    config = config or PersonalisationConfig()
    out_of_fold = out_of_fold or OutOfFoldConfig()
    labelled = check_user_data(model, x, y, labelled)
    x, y, labelled = to_model_device(model, x, y, labelled)
    k, n = out_of_fold.folds, len(x)
    if n < 2 * k:
        raise UserDataError(
            f"user has {n} personalisation images; {k}-fold out-of-fold personalisation "
            f"needs at least {2 * k}"
        )
    start = time.perf_counter()
    model.eval()  # frozen backbone: BatchNorm statistics must not move
    incoming = copy.deepcopy(model.exits.state_dict())
    augment = random_affine if config.augment else None
    train_source = FrozenFeatures(
        model, x, cache=config.cache, budget_mb=config.cache_budget_mb, augment=augment
    )
    source = train_source if augment is None else FrozenFeatures(model, x, budget_mb=config.cache_budget_mb)
    shared = source.exit_probabilities()
    targets = torch.where(labelled, y, shared[-1].argmax(dim=-1))
    fold = assign_folds(targets.cpu(), k, config.seed, out_of_fold.stratify).to(x.device)
    features_s = time.perf_counter() - start

    personalised = shared.clone()
    for f in range(k):
        held_out, train = torch.nonzero(fold == f).flatten(), torch.nonzero(fold != f).flatten()
        n_lab = int(labelled[train].sum())
        config.loss_weights().check_active(n_lab, len(train) - n_lab)
        model.exits.load_state_dict(incoming)
        _train(model, train_source, train, y, labelled, replace(config, seed=fold_seed(config.seed, f)))
        with torch.no_grad():
            features, final_logits = source.batch(held_out)
            logits = model.heads_forward(features) + [final_logits]
            personalised[:, held_out] = torch.stack(logits).softmax(dim=-1)
    folds_s = time.perf_counter() - start - features_s

    model.exits.load_state_dict(incoming)
    losses = _train(model, train_source, torch.arange(n, device=x.device), y, labelled, config)
    num_exits = model.num_exits
    if config.guard:
        keep, p_values = guard_decisions(
            personalised[:num_exits],
            shared[:num_exits],
            targets,
            config.guard_metric,
            out_of_fold.guard_test,
            out_of_fold.guard_confidence,
            config.seed,
        )
    else:
        keep, p_values = [True] * num_exits, [float("nan")] * num_exits
    for j, kept in enumerate(keep):
        if not kept:
            prefix = f"{j}."
            model.exits[j].load_state_dict(
                {m[len(prefix) :]: t for m, t in incoming.items() if m.startswith(prefix)}
            )
    calibration_probs = shared.clone()
    calibration_probs[torch.tensor(keep + [False])] = personalised[torch.tensor(keep + [False])]
    total_s = time.perf_counter() - start
    correct_new, _ = per_sample_scores(personalised[:num_exits], targets)
    correct_old, _ = per_sample_scores(shared[:num_exits], targets)
    result = PersonalisationResult(
        method="exits",
        seconds=total_s,
        n_train=n,
        n_val=0,
        guard_fired=[not kept for kept in keep] if config.guard else [],
        val_accuracy_before=correct_old.double().mean(dim=1).tolist(),
        val_accuracy_after=correct_new.double().mean(dim=1).tolist(),
        cached_exits=train_source.cached_exits,
        epoch_losses=losses,
    )
    return OutOfFoldResult(
        probs=calibration_probs,
        targets=targets,
        personalised_probs=personalised,
        shared_probs=shared,
        fold=fold,
        guard_fired=[not kept for kept in keep],
        guard_p_values=p_values,
        personalisation=result,
        seconds={
            "features_s": features_s,
            "folds_s": folds_s,
            "deploy_s": total_s - features_s - folds_s,
            "total_s": total_s,
        },
    )


def _train(model, source, index, y, labelled, config) -> list[float]:
    """`train_exits` under the config's seed for any global randomness (augmentation)."""
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        return train_exits(model, source, index, y, labelled, config)
