"""Training, personalisation, early-exit inference, calibration and profiling. No Flower here:
everything is usable from a notebook."""

from .calibration import (
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
from .inference import (
    EarlyExitOutput,
    dynamic_inference,
    exit_accuracies,
    exit_probabilities,
    fixed_exit_inference,
    fold_batchnorm,
)
from .losses import ExitLossWeights, exit_loss, sdn_exit_weights, sdn_loss
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
from .protocol import UserProtocol, run_user
from .train import TrainConfig, train_global

__all__ = [
    "THRESHOLDS", "Calibration", "CalibrationConfig", "ExitCosts", "apply_calibration",
    "calibrate", "pareto_front", "sweep", "load_model", "read_checkpoint", "save_checkpoint",
    "EarlyExitOutput", "dynamic_inference", "exit_accuracies", "exit_probabilities",
    "fixed_exit_inference", "fold_batchnorm", "ExitLossWeights", "exit_loss", "sdn_exit_weights",
    "sdn_loss", "METHODS", "PRESETS", "PersonalisationConfig", "PersonalisationResult",
    "finetune_final", "finetune_full", "no_personalisation", "personalise", "OutOfFoldConfig",
    "OutOfFoldResult", "personalise_out_of_fold", "confidence_profile", "latency_costs",
    "measure_latency", "peak_memory_mb", "UserProtocol", "run_user", "TrainConfig",
    "train_global",
]  # fmt: skip
