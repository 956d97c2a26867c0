"""Backbones as a sequence of blocks plus a final classifier.

Early exits can only be attached between blocks, so every backbone is split into
`(blocks, classifier)`: running the blocks in order and then the classifier reproduces the
torchvision model's forward pass exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.ops.misc import Conv2dNormActivation

from ..errors import CheckpointError, SettingsError

# MobileNetV2's settings (t, c, n, s) with strides adapted to 28x28 inputs: the first conv has
# stride 1 and only three stages downsample, so the last feature map is 4x4 instead of 1x1.
FEMNIST_MOBILENET_V2_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 1],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def split_resnet(model: tvm.ResNet) -> tuple[list[nn.Module], nn.Module]:
    """Stem, then every residual block of layer1..layer4 (works for ResNet-18/34/50/101/152)."""
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    blocks = [stem]
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        blocks.extend(layer)
    classifier = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    return blocks, classifier


def split_mobilenet_v2(model: tvm.MobileNetV2) -> tuple[list[nn.Module], nn.Module]:
    """Each entry of `features` is a block; pooling + dropout + linear is the classifier."""
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.classifier)
    return list(model.features), classifier


def _load_weights(model: nn.Module, weights: str | None, imagenet_weights) -> None:
    """`weights`: None/"none" (random init), "imagenet" (torchvision's, needs the hub or its
    cache) or a path to a local state dict / checkpoint."""
    if weights in (None, "none"):
        return
    if weights == "imagenet":
        model.load_state_dict(imagenet_weights.get_state_dict(progress=True))
        return
    path = Path(weights).expanduser()
    if not path.is_file():
        raise CheckpointError(f"backbone weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a torch file
        raise CheckpointError(
            f"backbone weights file {path} is not a readable torch file ({type(exc).__name__})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"backbone weights file {path} does not fit this model: {first}") from None


def resnet(depth: int, num_classes: int = 1000, weights: str | None = None, width_mult: float = 1.0):
    """torchvision ResNet-18/34/50 split into blocks; ImageNet size (3x224x224)."""
    if width_mult != 1.0:
        raise SettingsError(f"model.width_mult must be null for resnet{depth}, got {width_mult}")
    builders = {
        18: (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
        34: (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
        50: (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
    }
    if depth not in builders:
        raise ValueError(f"resnet depth must be one of {sorted(builders)}, got {depth}")
    build, imagenet = builders[depth]
    model = build(num_classes=1000 if weights == "imagenet" else num_classes)
    _load_weights(model, weights, imagenet)
    if model.fc.out_features != num_classes:  # pretrained on ImageNet, new task head
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return split_resnet(model)


def mobilenet_v2(num_classes: int = 1000, weights: str | None = None, width_mult: float = 1.0):
    """torchvision MobileNetV2 split into blocks; ImageNet size (3x224x224)."""
    if weights == "imagenet" and width_mult != 1.0:
        raise SettingsError("model.weights=imagenet exists only for mobilenet_v2 with width_mult=1.0")
    model = tvm.mobilenet_v2(
        num_classes=1000 if weights == "imagenet" else num_classes, width_mult=width_mult
    )
    _load_weights(model, weights, tvm.MobileNet_V2_Weights.IMAGENET1K_V2)
    if model.classifier[-1].out_features != num_classes:
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
    return split_mobilenet_v2(model)


def femnist_mobilenet_v2(num_classes: int = 62, weights: str | None = None, width_mult: float = 0.5):
    """MobileNetV2 for 1x28x28 inputs: grayscale stem with stride 1, last feature map 4x4."""
    if weights == "imagenet":
        raise SettingsError("model.weights: femnist_mobilenet_v2 has no ImageNet weights; use none or a file")
    model = tvm.mobilenet_v2(
        num_classes=num_classes,
        width_mult=width_mult,
        inverted_residual_setting=FEMNIST_MOBILENET_V2_SETTING,
    )
    stem_channels = model.features[0][0].out_channels
    model.features[0] = Conv2dNormActivation(
        1, stem_channels, stride=1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6
    )
    _load_weights(model, weights, None)
    return split_mobilenet_v2(model)


# name -> (builder, default input shape)
BACKBONES = {
    "resnet18": (lambda **kw: resnet(18, **kw), (3, 224, 224)),
    "resnet34": (lambda **kw: resnet(34, **kw), (3, 224, 224)),
    "resnet50": (lambda **kw: resnet(50, **kw), (3, 224, 224)),
    "mobilenet_v2": (mobilenet_v2, (3, 224, 224)),
    "femnist_mobilenet_v2": (femnist_mobilenet_v2, (1, 28, 28)),
}
