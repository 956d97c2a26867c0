"""Early-exit heads in the style of MSDNet's intermediate classifiers (Huang et al., 2018)."""

from __future__ import annotations

from torch import nn


def default_head_channels(in_channels: int) -> int:
    """MSDNet uses 128 channels on ImageNet backbones; thin backbones get thinner heads, so that
    all heads together stay a small fraction of the backbone's FLOPs."""
    return min(128, max(16, in_channels // 2))


class ExitHead(nn.Module):
    """Two 3x3 conv-BN-ReLU (stride 2 while the map is larger than `min_size`), global average
    pooling and a linear classifier. Small strided maps keep the heads cheap, which is what makes
    early exits pay off."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spatial_size: int,
        channels: int | None = None,
        min_size: int = 2,
    ):
        super().__init__()
        channels = channels or default_head_channels(in_channels)
        layers: list[nn.Module] = []
        size, c_in = spatial_size, in_channels
        for _ in range(2):
            stride = 2 if size > min_size else 1
            layers += [
                nn.Conv2d(c_in, channels, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
            size = (size - 1) // stride + 1
            c_in = channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.linear(self.pool(self.features(x)).flatten(1))
