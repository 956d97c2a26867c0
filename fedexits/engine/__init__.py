"""Training, personalisation, early-exit inference, calibration and profiling. No Flower here:
everything is usable from a notebook."""

from .calibration import (
    CALIBRATION_PRESETS,
    LTT_THRESHOLDS,
    ROUTES,
    RULES,
    THRESHOLDS,
    Calibration,
    CalibrationConfig,
    ExitCosts,
    apply_calibration,
    calibrate,
    pareto_front,
    sweep,
)
from .checkpoint import load_model, read_checkpoint, save_checkpoint
from .device import module_device, resolve_device
from .export import ExportSettings, export_onnx, export_user, read_manifest
from .inference import (
    EarlyExitOutput,
    dynamic_inference,
    exit_accuracies,
    exit_probabilities,
    fixed_exit_inference,
    fold_batchnorm,
)
from .latency import RUNTIMES, LatencySettings, network_latency_ms, profile_exit_latency
from .lifecycle import DayOutcome, DayRecord, Lifecycle, day_features, run_day
from .lifecycle_config import POLICIES, LifecycleConfig
from .lifecycle_run import LifecycleResult, accuracy_vs_samples, average_exits, run_lifecycle
from .losses import ExitLossWeights, exit_loss, sdn_exit_weights, sdn_loss
from .onnx_runtime import OnnxEarlyExit
from .orchestrator import OrchestratorConfig
from .out_of_fold import OutOfFoldConfig, OutOfFoldResult, personalise_out_of_fold
from .personalise import (
    METHODS,
    PRESETS,
    PersonalisationConfig,
    PersonalisationResult,
    finetune_final,
    finetune_full,
    no_personalisation,
    personalise,
)
from .profiling import confidence_profile, latency_costs, measure_latency, peak_memory_mb
from .pruning import (
    PRUNE_LEVELS,
    PRUNING_METHODS,
    PruningConfig,
    PruningResult,
    channel_shares,
    check_prunable,
    evaluate_networks,
    evaluate_pruned,
    final_network,
    prune_agnostic,
    prune_data,
    prune_sweep,
)
from .saved_exits import SavedExits, apply_exits, exits_file, load_exits, save_exits
from .train import TRAIN_PRESETS, TrainConfig, train_global
from .user_state import UserState

__all__ = [
    "CALIBRATION_PRESETS", "ROUTES", "RULES", "LTT_THRESHOLDS", "THRESHOLDS", "Calibration",
    "CalibrationConfig", "ExitCosts",
    "apply_calibration", "calibrate", "pareto_front", "sweep", "load_model", "read_checkpoint",
    "save_checkpoint", "EarlyExitOutput",
    "dynamic_inference", "exit_accuracies", "exit_probabilities", "fixed_exit_inference",
    "fold_batchnorm", "POLICIES", "DayOutcome", "DayRecord", "Lifecycle", "LifecycleConfig",
    "day_features", "run_day", "LifecycleResult", "accuracy_vs_samples", "average_exits",
    "run_lifecycle", "OrchestratorConfig", "UserState", "ExitLossWeights", "exit_loss",
    "sdn_exit_weights", "sdn_loss", "METHODS",
    "PRESETS", "PersonalisationConfig", "PersonalisationResult", "finetune_final",
    "finetune_full", "no_personalisation", "personalise", "PRUNING_METHODS", "PruningConfig",
    "PruningResult", "PRUNE_LEVELS", "channel_shares", "check_prunable", "evaluate_networks",
    "evaluate_pruned", "final_network", "prune_agnostic", "prune_data",
    "prune_sweep", "OutOfFoldConfig", "OutOfFoldResult", "personalise_out_of_fold",
    "confidence_profile", "latency_costs",
    "measure_latency", "peak_memory_mb", "TRAIN_PRESETS", "TrainConfig", "train_global",
    "ExportSettings", "export_onnx", "export_user", "read_manifest", "RUNTIMES",
    "LatencySettings", "network_latency_ms", "profile_exit_latency", "OnnxEarlyExit", "SavedExits",
    "apply_exits", "exits_file", "load_exits", "save_exits", "module_device", "resolve_device",
]  # fmt: skip
