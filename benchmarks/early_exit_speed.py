"""Wall-clock speedup of dynamic early-exit inference over the full network, on personalised users,
in ONNX Runtime (what a device deploys) and in eager PyTorch, side by side.

For each user: personalise its exits, calibrate the threshold at the drop tolerance (1 pp by
default) on its validation split, export the personalised model to ONNX (one graph per segment,
`fedexits.engine.export_onnx`), then time, on its test split, dynamic inference at that threshold
against the plain network, in both runtimes (median of --repeats, all in this run, timed
round-robin). The plain network is the single full graph in ONNX Runtime and `forward_to_exit`
in PyTorch. Reported for batch 1 (a phone classifying one image at a time) and for the whole test
split as one batch (exited samples are dropped from the batch). The FLOP-predicted speedup at the
same threshold comes from the cost table. Between the two sits the oracle speedup: each sample
timed as the network truncated at the exit it takes (ONNX Runtime's latency profile), i.e. what
the runtime's own cost per FLOP allows before early exit adds earlier heads and graph
boundaries. ONNX Runtime's predictions are checked against PyTorch's dynamic inference.

    python benchmarks/early_exit_speed.py --json results/early_exit_speed.json [hydra overrides]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import torch

from fedexits.engine import ExitCosts, OnnxEarlyExit, dynamic_inference, export_onnx
from fedexits.engine.inference import fold_batchnorm
from fedexits.engine.profiling import interleaved_medians_ms
from fedexits.errors import exits_2_on_bad_input
from fedexits.report.files import atomic_write_json

TIE_TOLERANCE = 1e-4  # confidences this close to the threshold may leave differently


@dataclass
class PersonalisedUser:
    user: str
    model: torch.nn.Module  # the shared model holding this user's exits (until the next user)
    cost_table: object
    threshold: float
    active_exits: list[bool]
    test_x: torch.Tensor
    test_y: torch.Tensor
    drop_tolerance_pp: float


def personalised_users(overrides: list[str], limit: int) -> Iterator[PersonalisedUser]:
    """The only wiring to the simulation: up to `limit` held-out users, each personalised and
    calibrated by the same per-user protocol as the Flower clients."""
    from fedexits.study import compose_config, get_worker, initial_exits, prepare, user_seed

    prepared = prepare(compose_config(overrides))
    settings = prepared.plan.settings
    worker = get_worker(prepared.plan.to_json())
    global_exits = initial_exits(prepared.plan, "global")
    for user in prepared.users[: min(limit, prepared.num_held_out)]:
        result = worker.personalise_user(user, global_exits, "global").result  # personalise + calibrate
        data = worker.population.load_user(user, seed=user_seed(settings.seed, user))
        yield PersonalisedUser(
            user,
            worker.model,
            prepared.cost_table,
            result.threshold,
            [bool(a) for a in result.active_exits],
            data.test_x,
            data.test_y,
            settings.calibration.drop_tolerance_pp,
        )


def time_user(model, runner: OnnxEarlyExit, table, x, thresholds, repeats: int) -> dict:
    """Wall time of dynamic vs full inference over x, at batch 1 and as one batch, eager and in
    ONNX Runtime, all timed round-robin (a disturbance hits every path alike)."""
    full = model.num_exits
    table = ExitCosts.flops(table)  # once, not per call

    def one_by_one(fn):
        return lambda: [fn(x[i : i + 1]) for i in range(len(x))]

    paths = {
        "dynamic_b1_s": one_by_one(lambda s: dynamic_inference(model, s, thresholds, table)),
        "full_b1_s": one_by_one(lambda s: model.forward_to_exit(s, full)),
        "dynamic_batch_s": lambda: dynamic_inference(model, x, thresholds, table, batch_size=len(x)),
        "full_batch_s": lambda: model.forward_to_exit(x, full),
        "ort_dynamic_b1_s": one_by_one(lambda s: runner.dynamic_inference(s, thresholds)),
        "ort_full_b1_s": one_by_one(lambda s: runner.fixed_exit_inference(s, full)),
        "ort_dynamic_batch_s": lambda: runner.dynamic_inference(x, thresholds, batch_size=len(x)),
        "ort_full_batch_s": lambda: runner.fixed_exit_inference(x, full, batch_size=len(x)),
    }
    with torch.no_grad():
        milliseconds = interleaved_medians_ms(
            list(paths.values()), repeats=repeats, warmup=1, max_seconds=float("inf")
        )
    return {name: ms / 1000 for name, ms in zip(paths, milliseconds)}


def prediction_mismatches(model, runner, x, thresholds, reference) -> int:
    """Samples where ONNX Runtime's early exit disagrees with PyTorch's (exit or prediction),
    not counting those whose confidence at an active exit is within TIE_TOLERANCE of the
    threshold."""
    out = runner.dynamic_inference(x, thresholds)
    with torch.no_grad():
        confidence = torch.stack(model(x)[:-1]).softmax(-1).max(-1).values
    near = torch.zeros(len(x), dtype=torch.bool)
    for k, t in enumerate(thresholds):
        if t is not None:
            near |= (confidence[k] - t).abs() < TIE_TOLERANCE
    differ = (out.exit_taken != reference.exit_taken) | (out.predictions != reference.predictions)
    return int((differ & ~near).sum())


def exit_overhead(latency, table) -> dict:
    """What an early exit costs in ONNX Runtime at batch 1 beyond its head's FLOPs, in MFLOPs of
    backbone compute (at the whole network's ms per MFLOP): per-operator dispatch and the graph
    boundary, which FLOPs do not see. The value for `calibration.exit_overhead_mflops`.
    `latency`: `OnnxEarlyExit.measure_latency`'s table."""
    latency = latency[latency["batch_size"] == 1].set_index("exit")
    full = len(table) - 1
    ms_per_mflop = latency.loc[full, "latency_ms"] / table["mflops"].iloc[-1]
    heads = latency.loc[: full - 1, "head_ms"].to_numpy() / ms_per_mflop - table["head_mflops"].iloc[:-1]
    return {
        "ms_per_mflop": float(ms_per_mflop),
        "head_ms": latency.loc[: full - 1, "head_ms"].tolist(),
        "exit_overhead_mflops": [float(h) for h in heads],
        "exit_overhead_mflops_median": float(statistics.median(heads)),
    }


def oracle_seconds(latency, exit_taken: torch.Tensor) -> dict:
    """Seconds if every sample ran only the network truncated at the exit it takes (an oracle
    that knows the exit beforehand: no earlier heads, no graph boundaries, no host loop), at
    batch 1 and per sample at the largest profiled batch. The speedup this allows is the ceiling
    that the runtime's own cost per FLOP sets, before any early-exit overhead."""
    counts = torch.bincount(exit_taken, minlength=int(latency["exit"].max()) + 1).numpy()
    out = {}
    for key, b in (("oracle_b1_s", 1), ("oracle_batch_s", int(latency["batch_size"].max()))):
        per_sample = latency[latency["batch_size"] == b].sort_values("exit")["per_sample_ms"].to_numpy()
        out[key] = float(counts @ per_sample) / 1000
        out[key.replace("oracle", "oracle_full")] = float(counts.sum() * per_sample[-1]) / 1000
    return out


def ratio(rows, slow: str, fast: str) -> float:
    return sum(r[slow] for r in rows) / sum(r[fast] for r in rows)


@exits_2_on_bad_input
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedexits.simulate")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and ONNX Runtime threads (a phone-like 1)"
    )
    parser.add_argument(
        "--no-fold",
        action="store_true",
        help="time the training-form model (BatchNorm not folded into convs)",
    )
    args = parser.parse_intermixed_args()  # options anywhere among the Hydra overrides
    torch.set_num_threads(args.threads)

    def deployed(model):
        """What runs on a device: BatchNorm folded into the convolutions (both paths alike)."""
        return model if args.no_fold else fold_batchnorm(model)

    rows, drop_tolerance, overhead = [], float("nan"), None
    with tempfile.TemporaryDirectory(prefix="early-exit-speed-") as tmp:
        for u in personalised_users(args.overrides, args.users):
            model, table, x, drop_tolerance = u.model, u.cost_table, u.test_x, u.drop_tolerance_pp
            thresholds = [u.threshold if on else None for on in u.active_exits]
            manifest = export_onnx(
                model, Path(tmp) / u.user, u.threshold, u.active_exits, fold_bn=not args.no_fold
            )
            runner = OnnxEarlyExit(manifest, threads=args.threads)
            if overhead is None:  # once: the backbone and the heads' shapes are every user's
                latency = runner.measure_latency()
                overhead = exit_overhead(latency, table)
                extra = overhead["exit_overhead_mflops_median"]
                print(f"an early exit costs {extra:.2f} MFLOPs beyond its head (median)")
            dynamic = dynamic_inference(model, x, thresholds, table)
            full = dynamic_inference(model, x, None, table)
            rows.append(
                {
                    "user": u.user,
                    "threshold": u.threshold,
                    "active_exits": u.active_exits,
                    "n_test": len(x),
                    "accuracy_dynamic": float((dynamic.predictions == u.test_y).float().mean()),
                    "accuracy_full": float((full.predictions == u.test_y).float().mean()),
                    "mflops_dynamic": dynamic.total_mflops,
                    "mflops_full": full.total_mflops,
                    "prediction_mismatches": prediction_mismatches(model, runner, x, thresholds, dynamic),
                    **oracle_seconds(latency, dynamic.exit_taken),
                    **time_user(deployed(model), runner, table, x, thresholds, args.repeats),
                }
            )
            r = rows[-1]
            print(
                f"{u.user}: threshold {r['threshold']:.2f}, accuracy {r['accuracy_dynamic']:.3f} vs "
                f"{r['accuracy_full']:.3f}, FLOP speedup {r['mflops_full'] / r['mflops_dynamic']:.2f}x, "
                f"wall ONNX Runtime {r['ort_full_b1_s'] / r['ort_dynamic_b1_s']:.2f}x (batch 1) "
                f"{r['ort_full_batch_s'] / r['ort_dynamic_batch_s']:.2f}x (one batch), eager "
                f"{r['full_b1_s'] / r['dynamic_b1_s']:.2f}x / {r['full_batch_s'] / r['dynamic_batch_s']:.2f}x"
            )

    flop_prediction = ratio(rows, "mflops_full", "mflops_dynamic")
    speedups = {
        "speedup_at_1pp": ratio(rows, "ort_full_batch_s", "ort_dynamic_batch_s"),
        "speedup_at_1pp_batch1": ratio(rows, "ort_full_b1_s", "ort_dynamic_b1_s"),
        "speedup_at_1pp_eager": ratio(rows, "full_batch_s", "dynamic_batch_s"),
        "speedup_at_1pp_batch1_eager": ratio(rows, "full_b1_s", "dynamic_b1_s"),
        "oracle_exit_speedup": ratio(rows, "oracle_full_batch_s", "oracle_batch_s"),
        "oracle_exit_speedup_batch1": ratio(rows, "oracle_full_b1_s", "oracle_b1_s"),
    }
    result = {
        **speedups,
        "flop_predicted_speedup": flop_prediction,
        "wall_over_flop_prediction": speedups["speedup_at_1pp"] / flop_prediction,
        "wall_over_flop_prediction_batch1": speedups["speedup_at_1pp_batch1"] / flop_prediction,
        "wall_over_flop_prediction_eager": speedups["speedup_at_1pp_eager"] / flop_prediction,
        "wall_over_flop_prediction_batch1_eager": speedups["speedup_at_1pp_batch1_eager"] / flop_prediction,
        "oracle_over_flop_prediction": speedups["oracle_exit_speedup"] / flop_prediction,
        "oracle_over_flop_prediction_batch1": speedups["oracle_exit_speedup_batch1"] / flop_prediction,
        "onnxruntime_over_eager_full_b1": ratio(rows, "full_b1_s", "ort_full_b1_s"),
        "onnxruntime_over_eager_dynamic_b1": ratio(rows, "dynamic_b1_s", "ort_dynamic_b1_s"),
        "exit_overhead": overhead,
        "active_exits_mean": statistics.mean(sum(r["active_exits"]) for r in rows),
        "prediction_mismatches": sum(r["prediction_mismatches"] for r in rows),
        "test_images": sum(r["n_test"] for r in rows),
        "accuracy_drop_pp": 100 * statistics.mean(r["accuracy_full"] - r["accuracy_dynamic"] for r in rows),
        "users": len(rows),
        "drop_tolerance_pp": drop_tolerance,
        "batchnorm_folded": not args.no_fold,
        "threads": args.threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "overrides": args.overrides,
        "per_user": rows,
    }
    atomic_write_json(result, args.json)
    for key in (
        *speedups,
        "flop_predicted_speedup",
        "wall_over_flop_prediction",
        "wall_over_flop_prediction_batch1",
        "wall_over_flop_prediction_eager",
        "wall_over_flop_prediction_batch1_eager",
        "oracle_over_flop_prediction",
        "oracle_over_flop_prediction_batch1",
        "onnxruntime_over_eager_full_b1",
        "accuracy_drop_pp",
        "prediction_mismatches",
    ):
        print(f"{key:40s} {result[key]:7.3f}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
