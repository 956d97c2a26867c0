"""Settings of a lifelong run (Hydra structured config, registered from these dataclasses):
which policies run, the buffer, the streams, the drift and the Orchestrator's rules."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.streams import DriftConfig, StreamConfig, check_drift_within
from ..errors import SettingsError
from .orchestrator import OrchestratorConfig
from .personalise import PersonalisationConfig

POLICIES = ("never", "once", "nightly", "orchestrator", "orchestrator+fedavg")


@dataclass(frozen=True)
class LifecycleConfig:
    """policies: which policies run (names from POLICIES); seed: streams, drift, exploration and
    personalisation seeds; buffer_size: inputs the device keeps for personalisation and
    calibration (the most recent); once_days: the days `once` (and the first calibration of
    `never` and the orchestrators) use."""

    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    seed: int = 0
    buffer_size: int = 256
    once_days: int = 3
    stream: StreamConfig = field(default_factory=StreamConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)

    def __post_init__(self):
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            got = unknown[0] if unknown else "an empty list"
            raise SettingsError(f"lifecycle.policies must be some of {', '.join(POLICIES)}, got {got!r}")
        if self.buffer_size < 2:
            raise SettingsError(f"lifecycle.buffer_size must be an integer >= 2, got {self.buffer_size!r}")
        if not 1 <= self.once_days <= self.stream.days:
            raise SettingsError(
                f"lifecycle.once_days must be in [1, stream.days={self.stream.days}], got {self.once_days!r}"
            )
        check_drift_within(self.stream, self.drift)


def check_buffer(config: LifecycleConfig, personalisation: PersonalisationConfig) -> None:
    if config.buffer_size < personalisation.batch_size:
        raise SettingsError(
            f"lifecycle.buffer_size must be >= one personalisation batch "
            f"({personalisation.batch_size}), got {config.buffer_size}"
        )
