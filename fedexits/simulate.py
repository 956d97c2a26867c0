"""python -m fedexits.simulate: personalise a population of users as Flower virtual clients.

Steps: check every setting, build (or reuse) the data cache, train (or reuse) the global
multi-exit model, run the Flower simulation (one virtual client per user, Ray backend), write the
report into Hydra's run directory. Settings: `fedexits.study.config` (Hydra groups dataset,
model, global_training, personalisation, calibration, init, simulation; presets +experiment=...).

Exit codes: 0 the run succeeded; 1 the run failed (a bug, whose traceback is shown, or too many
users failed: the report is still written); 2 bad input (a setting, a data or model file), one
line on stderr and nothing half-written. In a sweep (-m) a job with bad input fails alone with its
error.txt; the sweep exits 2 (bad input) or 1 (failed runs) once every job ran.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .errors import EXIT_BAD_INPUT, FedexitsError, one_line
from .report.files import atomic_write_text
from .study.config import hydra_error_line, register_configs, to_study_config
from .study.lifecycle import write_lifecycle_results
from .study.prepare import prepare
from .study.results import write_results

EXIT_RUN_FAILED = 1
_job_exit_codes: list[int] = []  # of the jobs run by this process (a sweep runs several)


def simulate(settings, out_dir: str | Path) -> dict:
    """The whole pipeline for validated settings; returns the summary (see study.results)."""
    from .fl.runtime import run_in_simulation_engine, run_lifecycle_in_simulation_engine

    started = time.perf_counter()
    prepared = prepare(settings, run_dir=out_dir)
    lifecycle = settings.mode == "lifecycle"
    run = run_lifecycle_in_simulation_engine if lifecycle else run_in_simulation_engine
    outcome = run(prepared)
    outcome.timings["total_s"] = time.perf_counter() - started
    if lifecycle:  # users living through days: timeline.csv and its report (study/lifecycle.py)
        return write_lifecycle_results(out_dir, prepared, outcome)
    return write_results(out_dir, prepared, outcome)


register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from .report.console import print_summary

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = simulate(to_study_config(cfg), out_dir)
    except FedexitsError as exc:
        # One clear line, no traceback; a sweep job fails alone (error.txt) and the sweep goes on.
        message = one_line(exc)
        atomic_write_text(out_dir / "error.txt", message + "\n")
        print(f"error: {message}", file=sys.stderr)
        _job_exit_codes.append(EXIT_BAD_INPUT)
        return
    print_summary(summary, out_dir)
    status = summary.get("meta", {}).get("status", {})
    if status.get("status") == "failed":
        print(f"run failed: {status.get('reason')} (report: {out_dir / 'report.md'})", file=sys.stderr)
        _job_exit_codes.append(EXIT_RUN_FAILED)
    else:
        _job_exit_codes.append(0)


def cli() -> int:
    """Run the Hydra app; Hydra's own errors (an unknown option, a value of the wrong type) become
    one line and exit code 2 like the project's, and any other exception keeps its traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ["HYDRA_FULL_ERROR"] = "1"  # let exceptions reach us instead of Hydra's printer
    try:
        main()
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"error: {hydra_error_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if EXIT_BAD_INPUT in _job_exit_codes:
        return EXIT_BAD_INPUT
    return EXIT_RUN_FAILED if EXIT_RUN_FAILED in _job_exit_codes else 0


if __name__ == "__main__":
    sys.exit(cli())
