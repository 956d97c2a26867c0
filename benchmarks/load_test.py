"""Load test at the paper's FEMNIST scale: 3,500 Flower virtual clients in one run.

Synthetic writers, a tiny model and little work per user, so the run measures the simulation
itself: every client registers, every user is personalised through Flower + Ray, and the driver's
memory stays bounded (messages go out `simulation.max_in_flight` at a time; a user's reply is a
few KB). Then the same users run in a plain in-process loop and the per-user results must be
identical (timing columns aside). Prints and writes JSON: time, driver peak RSS, clients.

    python benchmarks/load_test.py --clients 3500 --json results/load_test.json
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

from fedexits.errors import exits_2_on_bad_input
from fedexits.fl.runtime import run_in_simulation_engine
from fedexits.report.files import atomic_write_json
from fedexits.report.results import build_frames
from fedexits.report.schema import TIMING_COLUMNS
from fedexits.study import compose_config, get_worker, initial_exits, prepare, run_users_in_process


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def settings_for(clients: int, extra: list[str]):
    return compose_config(
        [
            "+experiment=smoke",
            f"dataset.num_writers={clients + 60}",
            f"dataset.num_held_out={clients}",
            "dataset.images_per_writer_mean=50",
            "dataset.images_per_writer_sd=5",
            "dataset.images_per_writer_min=30",
            "dataset.n_test=15",
            "global_training.epochs=1",
            "personalisation.epochs=2",
            "simulation.num_users=null",
            "latency.repeats=3",
            "latency.batch_sizes=[1]",
            *extra,
        ]
    )


@exits_2_on_bad_input
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    parser.add_argument("--clients", type=int, default=3500)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--skip-loop", action="store_true", help="do not run the in-process comparison")
    args = parser.parse_intermixed_args()  # options anywhere among the Hydra overrides

    started = time.perf_counter()
    settings = settings_for(args.clients, args.overrides)
    client_cpus = max(1, int(settings.simulation.client_cpus))
    prepared = prepare(settings)
    prepared_s = time.perf_counter() - started
    rss_before_flower = peak_rss_mb()
    started = time.perf_counter()
    outcome = run_in_simulation_engine(prepared)
    flower_s = time.perf_counter() - started
    rss_after_flower = peak_rss_mb()
    flower = build_frames(outcome.records, prepared.cost_table)
    result = {
        "clients": args.clients,
        "users_ok": int(flower["per_user"]["user"].nunique()) if len(flower["per_user"]) else 0,
        "users_failed": len(flower["failures"]),
        "prepare_s": prepared_s,
        "flower_s": flower_s,
        "flower_per_client_ms": 1000 * flower_s / args.clients,
        "driver_peak_rss_mb_before_flower": rss_before_flower,
        "driver_peak_rss_mb_after_flower": rss_after_flower,
    }
    if not args.skip_loop:
        get_worker.cache_clear()
        torch.set_num_threads(client_cpus)  # as each Flower client: the same work, same threads
        started = time.perf_counter()
        users = prepared.users[: prepared.num_held_out]
        loop = build_frames(
            run_users_in_process(
                prepared.plan, users, initial_exits(prepared.plan, "global"), progress=False
            ),
            prepared.cost_table,
        )
        result["loop_s"] = time.perf_counter() - started
        keep = [c for c in loop["per_user"].columns if c not in TIMING_COLUMNS]
        a, b = (
            f["per_user"][keep].sort_values(["user", "stage", "exit"]).reset_index(drop=True)
            for f in (flower, loop)
        )
        result["identical_to_loop"] = bool(a.equals(b))
    atomic_write_json(result, args.json)
    for key, value in result.items():
        print(f"{key:36s} {value}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
