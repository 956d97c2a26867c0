"""What does running users as Flower virtual clients (Ray backend) cost over a plain loop?

The same held-out users, the same per-user work (`fedexits.study.worker`), in one run: first a plain
in-process loop, then `python -m fedexits.simulate`'s Flower simulation (Ray start-up included).
Writes JSON with `flower_over_loop` and checks that both paths computed the same results.

    python benchmarks/simulation_overhead.py --num-clients 250 --json results/simulation_overhead.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from fedexits.errors import exits_2_on_bad_input
from fedexits.fl.runtime import run_in_simulation_engine
from fedexits.report.files import atomic_write_json
from fedexits.report.results import build_frames
from fedexits.report.schema import TIMING_COLUMNS
from fedexits.study import (
    compose_config,
    get_worker,
    initial_exits,
    prepare,
    run_users_in_process,
    sample_users,
)


@exits_2_on_bad_input
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedexits.simulate")
    parser.add_argument("--num-clients", type=int, default=250)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_intermixed_args()  # options anywhere among the Hydra overrides

    overrides = [f"simulation.num_users={args.num_clients}", "init=global", *args.overrides]
    settings = compose_config(overrides)
    if settings.dataset.num_held_out < args.num_clients:
        settings = compose_config([*overrides, f"dataset.num_held_out={args.num_clients}"])
    prepared = prepare(settings)
    users = [prepared.users[p] for p in sample_users(prepared.num_held_out, args.num_clients, settings.seed)]
    exits = initial_exits(prepared.plan, "global")

    # The loop gets its best setting: all cores for torch's kernels, or one thread (small ops
    # often run faster single-threaded); the faster of the two is the baseline.
    loop_times = {}
    for threads in sorted({1, torch.get_num_threads()}, reverse=True):
        torch.set_num_threads(threads)
        started = time.perf_counter()
        loop_records = run_users_in_process(prepared.plan, users, exits)
        loop_times[threads] = time.perf_counter() - started
        get_worker.cache_clear()
    loop_threads = min(loop_times, key=loop_times.get)
    loop_s = loop_times[loop_threads]

    started = time.perf_counter()
    flower_records = run_in_simulation_engine(prepared).records
    flower_s = time.perf_counter() - started

    frames = [build_frames(r, prepared.cost_table)["per_user"] for r in (loop_records, flower_records)]
    keep = [c for c in frames[0].columns if c not in TIMING_COLUMNS]
    a, b = (f[keep].sort_values(["user", "stage", "exit"]).reset_index(drop=True) for f in frames)
    same = bool(a.equals(b))
    accuracy_gap = float((a["accuracy"] - b["accuracy"]).abs().max()) if len(a) == len(b) else float("nan")
    result = {
        "flower_over_loop": flower_s / loop_s,
        "loop_s": loop_s,
        "flower_s": flower_s,
        "clients": len(users),
        "loop_per_client_s": loop_s / len(users),
        "flower_per_client_s": flower_s / len(users),
        "identical_results": same,
        "max_accuracy_difference": accuracy_gap,
        "loop_s_by_threads": loop_times,
        "loop_torch_threads": loop_threads,
        "flower_client_cpus": settings.simulation.client_cpus,
        "failed": {
            "loop": sum(r.result is None for r in loop_records),
            "flower": sum(r.result is None for r in flower_records),
        },
        "overrides": overrides,
    }
    atomic_write_json(result, args.json)
    print(pd.Series({k: v for k, v in result.items() if not isinstance(v, (dict, list))}).to_string())
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
