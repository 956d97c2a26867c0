"""Multi-exit CNNs: backbones split into blocks, MSDNet-style exit heads, FLOPs and parameters."""

from .backbones import BACKBONES
from .costs import cost_table, count_flops, count_params, place_exits
from .heads import ExitHead
from .multi_exit import MODEL_PRESETS, ModelConfig, MultiExitNetwork, MultiExitSpec, build_multi_exit

__all__ = [
    "BACKBONES",
    "ExitHead",
    "MODEL_PRESETS",
    "ModelConfig",
    "MultiExitNetwork",
    "MultiExitSpec",
    "build_multi_exit",
    "cost_table",
    "count_flops",
    "count_params",
    "place_exits",
]
