"""The study layer: a run's typed settings and plan, preparing it (data cache, global model,
latency profile), the per-user protocol and worker, and writing its results. Used by
`fedexits.simulate` and `fedexits.fl` above it; uses engine, data, models and report below it.

    settings = compose_config(["+experiment=smoke"])       # the command line's settings
    prepared = prepare(settings)                            # data cache + global model
    records = run_users_in_process(prepared.plan, prepared.users[:3], initial_exits(prepared.plan, "global"))
"""

from .config import StudyConfig, compose_config
from .plan import LatencyProfile, RunPlan, partition_users, sample_users
from .prepare import Prepared, initial_exits, prepare
from .protocol import run_user, user_seed
from .results import RunOutcome, run_status, write_results
from .worker import Worker, get_worker, run_users_in_process

__all__ = [
    "LatencyProfile", "Prepared", "RunOutcome", "RunPlan", "StudyConfig", "Worker",
    "compose_config", "get_worker", "initial_exits", "partition_users", "prepare", "run_status",
    "run_user", "run_users_in_process", "sample_users", "user_seed", "write_results",
]  # fmt: skip
