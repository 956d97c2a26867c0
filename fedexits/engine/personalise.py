"""On-device personalisation (the paper's step): train the exits of one user, nothing else.

Backbone and final classifier stay frozen, so the final exit's output is bit-identical before and
after: it remains the fail-safe. Usable without Flower:

    result = personalise(model, x, y, labelled=mask, config=PersonalisationConfig(epochs=10))
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ..errors import SettingsError, UserDataError, check_settings
from .device import module_device
from .features import FrozenFeatures
from .losses import ExitLossWeights, exit_loss

# Named settings (the command line's `personalisation=NAME`): changes to the defaults below.
# "paper" is the paper's setting (SGD, lr 0.01, 10 epochs, no guard); on real FEMNIST it made exits
# worse for most writers (README, "Choosing the personalisation defaults").
GUARD_METRICS = ("cross_entropy", "accuracy")
PRESETS: dict[str, dict] = {
    "default": {},
    "paper": dict(optimizer="sgd", lr=0.01, momentum=0.9, epochs=10, guard=False),
}


@dataclass
class PersonalisationConfig:
    alpha: float = 1.0
    beta: float = 0.0
    gamma: float = 1.0
    temperature: float = 3.0
    epochs: int = 10
    lr: float = 0.001
    optimizer: str = "sgd"  # "sgd" or "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    guard: bool = True  # keep an exit's global weights unless personalised ones win on validation
    guard_metric: str = "cross_entropy"  # or "accuracy" (ties broken by cross-entropy)
    val_fraction: float = 0.2
    cache: bool = True  # compute frozen-backbone features once (else: every epoch)
    cache_budget_mb: float = 512.0
    augment: bool = False  # random affine per sample; disables the cache
    seed: int = 0

    def __post_init__(self):
        self.loss_weights()  # validates alpha, beta, gamma, temperature
        check_settings(
            "personalisation",
            self,
            [
                ("epochs", self.epochs >= 0, "an integer >= 0"),
                ("lr", self.lr > 0, "> 0"),
                ("batch_size", self.batch_size >= 2, "an integer >= 2"),
                ("val_fraction", 0 < self.val_fraction < 1, "in (0, 1)"),
                ("optimizer", self.optimizer in ("sgd", "adam"), "'sgd' or 'adam'"),
                ("guard_metric", self.guard_metric in GUARD_METRICS, "'cross_entropy' or 'accuracy'"),
                ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                ("weight_decay", self.weight_decay >= 0, ">= 0"),
                ("cache_budget_mb", self.cache_budget_mb >= 0, ">= 0"),
            ],
        )

    @classmethod
    def preset(cls, name: str, **overrides) -> PersonalisationConfig:
        if name not in PRESETS:
            raise SettingsError(f"unknown personalisation preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def loss_weights(self) -> ExitLossWeights:
        return ExitLossWeights(self.alpha, self.beta, self.gamma, self.temperature)


@dataclass
class PersonalisationResult:
    method: str
    seconds: float
    n_train: int  # samples trained on
    n_val: int  # samples kept for the guard
    guard_fired: list[bool] = field(default_factory=list)  # per early exit
    val_accuracy_before: list[float] = field(default_factory=list)
    val_accuracy_after: list[float] = field(default_factory=list)
    cached_exits: list[int] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def check_user_data(model, x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor | None):
    """Validate one user's tensors; returns the labelled mask."""
    if x.ndim != 4 or len(x) == 0:
        raise UserDataError(f"user dataset is empty or not (N, C, H, W): got shape {tuple(x.shape)}")
    if tuple(x.shape[1:]) != tuple(model.input_shape):
        raise UserDataError(f"user images have shape {tuple(x.shape[1:])}, model expects {model.input_shape}")
    if y.shape != (len(x),):
        raise UserDataError(f"labels must have shape ({len(x)},), got {tuple(y.shape)}")
    num_classes = num_classes_of(model)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise UserDataError(
            f"labels must be in 0..{num_classes - 1} for this model, got {int(y.min())}..{int(y.max())}"
        )
    if labelled is None:
        return torch.ones(len(x), dtype=torch.bool)
    if labelled.shape != (len(x),) or labelled.dtype != torch.bool:
        raise UserDataError(f"labelled mask must be a bool tensor of shape ({len(x)},)")
    return labelled


def to_model_device(model, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors on the model's device (a no-op on the CPU)."""
    device = module_device(model)
    return tuple(t.to(device) for t in tensors)


def num_classes_of(model) -> int:
    return model.exits[0].linear.out_features if model.num_exits else model.spec.num_classes


def split_validation(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of n samples into (train, validation); at least one sample on each side."""
    if n < 2:
        raise UserDataError(f"user has {n} personalisation sample(s); the guard needs at least 2")
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive batches; a trailing single sample joins the previous batch
    (BatchNorm in training mode needs two)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [(start, starts[i + 1] if i + 1 < len(starts) else n) for i, start in enumerate(starts)]


def _batches(index: torch.Tensor, batch_size: int):
    for start, end in batch_bounds(len(index), batch_size):
        yield index[start:end]


def make_optimizer(params, config: PersonalisationConfig) -> torch.optim.Optimizer:
    """`foreach`: one fused update over all exit tensors instead of a few ops per tensor (PyTorch
    enables it by default only on GPUs); it matters for many small heads."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, foreach=True
    )


def random_affine(x: torch.Tensor) -> torch.Tensor:
    """Small per-sample shifts, rotations and scalings (handwriting-like augmentation)."""
    from torchvision.transforms import v2

    affine = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
    return torch.stack([affine(sample) for sample in x])


@torch.no_grad()
def _exit_scores(model, source: FrozenFeatures, y, labelled) -> tuple[list, list]:
    """Per early exit: accuracy and cross-entropy on the samples of `source`, against labels
    where labelled and the final exit's top-1 elsewhere: what the user will get, whatever mix of
    loss terms trained the exits."""
    index = torch.arange(len(source.x))
    features, final_logits = source.batch(index)
    targets = torch.where(labelled, y, final_logits.argmax(1))
    model.exits.eval()
    accuracies, losses = [], []
    for head, f in zip(model.exits, features):
        logits = head(f)
        accuracies.append((logits.argmax(1) == targets).float().mean().item())
        losses.append(F.cross_entropy(logits, targets).item())
    return accuracies, losses


def train_exits(
    model,
    source: FrozenFeatures,
    index: torch.Tensor,
    y: torch.Tensor,
    labelled: torch.Tensor,
    config: PersonalisationConfig,
) -> list[float]:
    """Train the exit heads for `config.epochs` on the samples `index` of `source` (`y` and
    `labelled` are indexed like `source`); the backbone's features come from `source`, so several
    trainings on subsets of one user (out-of-fold) share one backbone pass. Returns epoch losses."""
    weights = config.loss_weights()
    optimizer = make_optimizer(model.exit_parameters(), config)
    generator = torch.Generator().manual_seed(config.seed)
    bounds = batch_bounds(len(index), config.batch_size)
    epoch_losses = []
    for _ in range(config.epochs):
        model.exits.train()
        total, batches = 0.0, 0
        order = index[torch.randperm(len(index), generator=generator)]
        for idx, features, final_logits in source.epoch(order, bounds):
            logits = model.heads_forward(features)
            loss = sum(exit_loss(z, final_logits, y[idx], labelled[idx], weights) for z in logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        epoch_losses.append(total / max(batches, 1))
    model.exits.eval()
    return epoch_losses


def personalise(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    labelled: torch.Tensor | None = None,
    config: PersonalisationConfig | None = None,
    **overrides,
) -> PersonalisationResult:
    """Train the model's early exits in place on one user's data.

    Labelled samples use the alpha term, unlabelled ones the gamma term, every sample the beta
    term. With the guard on, a validation split is kept and exits that do not improve on it keep
    their incoming weights.
    """
    config = replace(config or PersonalisationConfig(), **overrides)
    labelled = check_user_data(model, x, y, labelled)
    x, y, labelled = to_model_device(model, x, y, labelled)
    weights = config.loss_weights()
    start = time.perf_counter()
    train_idx = torch.arange(len(x))
    val_idx = train_idx[:0]
    if config.guard:
        train_idx, val_idx = split_validation(len(x), config.val_fraction, config.seed)
    n_lab = int(labelled[train_idx].sum())
    weights.check_active(n_lab, len(train_idx) - n_lab)

    model.eval()  # frozen backbone: BatchNorm statistics must not move
    augment = random_affine if config.augment else None
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        source = FrozenFeatures(
            model, x[train_idx], cache=config.cache, budget_mb=config.cache_budget_mb, augment=augment
        )
        y_train, lab_train = y[train_idx], labelled[train_idx]
        if config.guard:
            val_source = FrozenFeatures(model, x[val_idx])
            before = _exit_scores(model, val_source, y[val_idx], labelled[val_idx])
            incoming = copy.deepcopy(model.exits.state_dict())

        epoch_losses = train_exits(model, source, torch.arange(len(train_idx)), y_train, lab_train, config)

    result = PersonalisationResult(
        method="exits",
        seconds=0.0,
        n_train=len(train_idx),
        n_val=len(val_idx),
        cached_exits=source.cached_exits,
        epoch_losses=epoch_losses,
    )
    if config.guard:
        after = _exit_scores(model, val_source, y[val_idx], labelled[val_idx])
        result.val_accuracy_before, result.val_accuracy_after = before[0], after[0]
        for k in range(model.num_exits):
            if config.guard_metric == "cross_entropy":
                better = after[1][k] < before[1][k]
            else:
                better = after[0][k] > before[0][k] or (
                    after[0][k] == before[0][k] and after[1][k] < before[1][k]
                )
            result.guard_fired.append(not better)
            if not better:
                prefix = f"{k}."
                model.exits[k].load_state_dict(
                    {n[len(prefix) :]: t for n, t in incoming.items() if n.startswith(prefix)}
                )
    result.seconds = time.perf_counter() - start
    return result


def finetune_final(model, x, y, labelled=None, config=None, **overrides) -> PersonalisationResult:
    """Baseline: fine-tune only the final classifier (on cached last-block features)."""
    config = replace(config or PersonalisationConfig(), **overrides)
    labelled = check_user_data(model, x, y, labelled)
    if not labelled.any():
        raise UserDataError("final-classifier fine-tuning needs labelled samples; this user has none")
    x, y, labelled = to_model_device(model, x, y, labelled)
    start = time.perf_counter()
    model.eval()
    with torch.no_grad():
        last = model.attach_point_features(x)[-1]
    last, y_lab = last[labelled], y[labelled]
    optimizer = make_optimizer(model.classifier.parameters(), config)
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    with torch.random.fork_rng():  # dropout draws from the user's seed, not the process's history
        torch.manual_seed(config.seed)
        for _ in range(config.epochs):
            model.classifier.train()
            for idx in _batches(torch.randperm(len(y_lab), generator=generator), config.batch_size):
                loss = F.cross_entropy(model.classifier(last[idx]), y_lab[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
    model.eval()
    return PersonalisationResult("final", time.perf_counter() - start, len(y_lab), 0, epoch_losses=losses)


def finetune_full(model, x, y, labelled=None, config=None, **overrides) -> PersonalisationResult:
    """Baseline: fine-tune every weight (BatchNorm statistics frozen) with CE at every exit on
    the labelled samples; the backbone is recomputed every step."""
    config = replace(config or PersonalisationConfig(), **overrides)
    labelled = check_user_data(model, x, y, labelled)
    if not labelled.any():
        raise UserDataError("full fine-tuning needs labelled samples; this user has none")
    x, y, labelled = to_model_device(model, x, y, labelled)
    start = time.perf_counter()
    x_lab, y_lab = x[labelled], y[labelled]
    optimizer = make_optimizer(model.parameters(), config)
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    model.eval()  # BatchNorm and dropout in eval mode (nothing random); gradients reach every weight
    for _ in range(config.epochs):
        for idx in _batches(torch.randperm(len(y_lab), generator=generator), config.batch_size):
            loss = sum(F.cross_entropy(z, y_lab[idx]) for z in model(x_lab[idx]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
    return PersonalisationResult("full", time.perf_counter() - start, len(y_lab), 0, epoch_losses=losses)


def no_personalisation(model, x, y, labelled=None, config=None, **overrides) -> PersonalisationResult:
    """Baseline: the global model as is."""
    check_user_data(model, x, y, labelled)
    return PersonalisationResult("none", 0.0, 0, 0)


METHODS = {
    "exits": personalise,
    "final": finetune_final,
    "full": finetune_full,
    "none": no_personalisation,
}


def training_step_mflops(model, config: PersonalisationConfig) -> float:
    """MFLOPs per sample of one personalisation step (heads forward and backward), counted by
    torch's flop counter on one batch of cached features, on a copy of the heads."""
    batch = max(2, config.batch_size)
    with torch.no_grad():
        features, final_logits = model.backbone_features(torch.zeros(batch, *model.input_shape))
    heads = copy.deepcopy(model.exits).train()
    labels = torch.zeros(batch, dtype=torch.long)
    labelled = torch.ones(batch, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        logits = [head(f) for head, f in zip(heads, features)]
        sum(exit_loss(z, final_logits, labels, labelled, config.loss_weights()) for z in logits).backward()
    return counter.get_total_flops() / batch / 1e6
