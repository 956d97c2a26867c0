"""Training, personalisation, early-exit inference, calibration and profiling. No Flower here:
everything is usable from a notebook."""

from .calibration import THRESHOLDS, Calibration, ExitCosts, apply_calibration, calibrate, pareto_front, sweep
from .checkpoint import load_model, read_checkpoint, save_checkpoint
from .inference import (
    EarlyExitOutput,
    dynamic_inference,
    exit_accuracies,
    exit_probabilities,
    fixed_exit_inference,
    fold_batchnorm,
)
from .lifecycle import DayOutcome, DayRecord, Lifecycle, day_features, run_day
from .lifecycle_config import POLICIES, LifecycleConfig
from .lifecycle_run import LifecycleResult, accuracy_vs_samples, average_exits, run_lifecycle
from .losses import ExitLossWeights, exit_loss, sdn_exit_weights, sdn_loss
from .orchestrator import OrchestratorConfig, UserState
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
    "THRESHOLDS", "Calibration", "ExitCosts", "apply_calibration", "calibrate", "pareto_front",
    "sweep", "load_model", "read_checkpoint", "save_checkpoint", "EarlyExitOutput",
    "dynamic_inference", "exit_accuracies", "exit_probabilities", "fixed_exit_inference",
    "fold_batchnorm", "POLICIES", "DayOutcome", "DayRecord", "Lifecycle", "LifecycleConfig",
    "day_features", "run_day", "LifecycleResult", "accuracy_vs_samples", "average_exits",
    "run_lifecycle", "OrchestratorConfig", "UserState", "ExitLossWeights", "exit_loss",
    "sdn_exit_weights", "sdn_loss", "METHODS",
    "PRESETS", "PersonalisationConfig", "PersonalisationResult", "finetune_final",
    "finetune_full", "no_personalisation", "personalise", "confidence_profile", "latency_costs",
    "measure_latency", "peak_memory_mb", "UserProtocol", "run_user", "TrainConfig",
    "train_global",
]  # fmt: skip
