"""A CNN with early exits: blocks, exit heads attached after some blocks, the final classifier."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from ..errors import SettingsError, check_settings
from .backbones import BACKBONES
from .costs import block_flops, place_exits
from .heads import ExitHead


class MultiExitNetwork(nn.Module):
    """`forward` returns the logits of every exit, early exits first and the final classifier last.

    Exit `k` is attached after block `exit_after[k]`. Exit indices run 0..M-1 for early exits and
    M (== `num_exits`) denotes the final classifier.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        classifier: nn.Module,
        heads: Sequence[nn.Module],
        exit_after: Sequence[int],
        input_shape: tuple[int, int, int],
    ):
        super().__init__()
        exit_after = tuple(int(j) for j in exit_after)
        if len(heads) != len(exit_after):
            raise ValueError(f"{len(heads)} exit heads but {len(exit_after)} attach points")
        if any(b <= a for a, b in zip(exit_after, exit_after[1:])):
            raise ValueError(f"exit attach points must be strictly increasing, got {exit_after}")
        if exit_after and (exit_after[0] < 0 or exit_after[-1] >= len(blocks) - 1):
            raise ValueError(f"exit attach points {exit_after} outside blocks 0..{len(blocks) - 2}")
        self.blocks = nn.ModuleList(blocks)
        self.classifier = classifier
        self.exits = nn.ModuleList(heads)
        self.exit_after = exit_after
        self.input_shape = tuple(input_shape)

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.attach_point_features(x)
        final = features.pop()
        logits = [head(f) for head, f in zip(self.exits, features)]
        logits.append(self.classifier(final))
        return (logits, features) if return_features else logits

    def backbone_features(self, x: torch.Tensor, upto: int | None = None):
        """Features at the attach points of exits 0..upto-1 (all by default) and, when the whole
        backbone ran, the final logits. The heads are not run: this is what personalisation caches.
        """
        if upto is None or upto >= self.num_exits:
            features = self.attach_point_features(x)
            final_logits = self.classifier(features.pop())
            return features, final_logits
        return self.attach_point_features(x, stop_after_exit=upto - 1), None

    def heads_forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [head(f) for head, f in zip(self.exits, features)]

    def forward_to_exit(self, x: torch.Tensor, exit_index: int) -> torch.Tensor:
        """Fixed-exit mode: the network truncated at `exit_index` (M = the full network)."""
        if not 0 <= exit_index <= self.num_exits:
            raise ValueError(f"exit index must be in 0..{self.num_exits}, got {exit_index}")
        if exit_index == self.num_exits:
            for block in self.blocks:
                x = block(x)
            return self.classifier(x)
        for block in self.blocks[: self.exit_after[exit_index] + 1]:
            x = block(x)
        return self.exits[exit_index](x)

    def attach_point_features(self, x, stop_after_exit: int | None = None) -> list[torch.Tensor]:
        """Run blocks, keeping the output at every attach point and (unless stopped early) the
        last block's output as the final element."""
        kept, next_exit = [], 0
        last_block = len(self.blocks) - 1
        if stop_after_exit is not None:
            last_block = self.exit_after[stop_after_exit]
        for j in range(last_block + 1):
            x = self.blocks[j](x)
            if next_exit < self.num_exits and self.exit_after[next_exit] == j:
                kept.append(x)
                next_exit += 1
        if stop_after_exit is None:
            kept.append(x)
        return kept

    def backbone_modules(self) -> list[nn.Module]:
        return [self.blocks, self.classifier]

    def exit_parameters(self) -> list[nn.Parameter]:
        return list(self.exits.parameters())

    def freeze_backbone(self) -> None:
        """Backbone and final classifier frozen: the final exit stays a fail-safe."""
        for module in self.backbone_modules():
            module.requires_grad_(False)


@dataclass
class ModelConfig:
    """The network a study uses (the command line's `model` group); the population adds the
    number of classes and the input size (see `MultiExitSpec.from_config`)."""

    backbone: str = "femnist_mobilenet_v2"
    num_exits: int = 6
    width_mult: float | None = None  # None: the backbone's own default (0.5 for femnist_mobilenet_v2)
    head_channels: int | None = None  # None: per-exit default (see heads.default_head_channels)
    weights: str = "none"  # "none" (random), "imagenet" (torchvision's), or a weights file

    def __post_init__(self):
        check_settings(
            "model",
            self,
            [
                ("backbone", self.backbone in BACKBONES, "one of " + ", ".join(sorted(BACKBONES))),
                ("num_exits", self.num_exits >= 1, "an integer >= 1"),
                ("width_mult", self.width_mult is None or self.width_mult > 0, "> 0 (or null)"),
                ("head_channels", self.head_channels is None or self.head_channels >= 1, ">= 1 (or null)"),
            ],
        )


# Named networks (the command line's `model=NAME`): changes to ModelConfig's defaults.
MODEL_PRESETS: dict[str, dict] = {
    "femnist_mobilenet_v2": {},  # 28x28 MobileNetV2, stride-1 stem, width 0.5
    "mobilenet_v2": dict(backbone="mobilenet_v2", width_mult=1.0, weights="imagenet"),
    "resnet50": dict(backbone="resnet50", weights="imagenet"),
}


@dataclass(frozen=True)
class MultiExitSpec:
    """Everything needed to rebuild a multi-exit network; stored in checkpoints."""

    backbone: str = ModelConfig.backbone
    num_classes: int = 62
    num_exits: int = ModelConfig.num_exits
    width_mult: float | None = None  # None: the backbone's default
    head_channels: int | None = None  # None: per-exit default (see heads.default_head_channels)
    input_shape: tuple[int, int, int] | None = None  # None: the backbone's default
    weights: str | None = None  # "none", "imagenet" or a file; not part of the architecture

    @classmethod
    def from_config(cls, config: ModelConfig, num_classes: int, input_shape) -> MultiExitSpec:
        return cls(
            backbone=config.backbone,
            num_classes=num_classes,
            num_exits=config.num_exits,
            width_mult=config.width_mult,
            head_channels=config.head_channels,
            input_shape=tuple(input_shape),
            weights=config.weights,
        )

    def architecture(self) -> dict:
        """The fields that must match for a checkpoint to fit (weights excluded)."""
        arch = asdict(self)
        arch.pop("weights")
        arch["input_shape"] = list(self.resolved_input_shape())
        return arch

    def resolved_input_shape(self) -> tuple[int, int, int]:
        if self.backbone not in BACKBONES:
            raise SettingsError(f"model.backbone must be one of {sorted(BACKBONES)}, got {self.backbone!r}")
        return tuple(self.input_shape or BACKBONES[self.backbone][1])


def build_multi_exit(
    spec: MultiExitSpec | None = None, seed: int | None = None, **overrides
) -> MultiExitNetwork:
    """Build a backbone, measure its per-block FLOPs and attach `num_exits` MSDNet-style heads at
    equidistant fractions of those FLOPs. With `seed`, the random initial weights come from it
    (without touching the global random state), so a cold run is reproducible."""
    spec = replace(spec or MultiExitSpec(), **overrides)
    if seed is None:
        return _build(spec)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _build(spec)


def _build(spec: MultiExitSpec) -> MultiExitNetwork:
    input_shape = spec.resolved_input_shape()
    if spec.num_classes < 2:
        raise SettingsError(f"the model needs at least 2 classes, got {spec.num_classes}")
    builder = BACKBONES[spec.backbone][0]
    kwargs = {"num_classes": spec.num_classes, "weights": spec.weights}
    if spec.width_mult is not None:
        kwargs["width_mult"] = spec.width_mult
    blocks, classifier = builder(**kwargs)
    flops, classifier_flops, shapes = block_flops(blocks, classifier, input_shape)
    total = sum(flops) + classifier_flops
    cumulative = [sum(flops[: j + 1]) / total for j in range(len(flops))]
    exit_after = place_exits(cumulative, spec.num_exits)
    heads = [
        ExitHead(shapes[j][0], spec.num_classes, shapes[j][-1], channels=spec.head_channels)
        for j in exit_after
    ]
    model = MultiExitNetwork(blocks, classifier, heads, exit_after, input_shape)
    model.spec = spec
    # Channels-last convolutions are 25-35% faster on CPU, for training and inference alike.
    return model.to(memory_format=torch.channels_last)
