"""Wall-clock speedup of dynamic early-exit inference over the full network, on personalised users.

For each user: personalise its exits, calibrate the threshold at the drop tolerance (1 pp by
default) on its validation split, then time, on its test split, dynamic inference at that
threshold against the plain network (median of --repeats, both in this run, timed
round-robin). Reported for batch 1 (a phone classifying one image at a time) and for the
whole test split as one batch (exited samples are dropped from the batch). The FLOP-predicted
speedup at the same threshold comes from the cost table.

    python benchmarks/early_exit_speed.py --json results/early_exit_speed.json [hydra overrides]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from fedexits.engine import ExitCosts, dynamic_inference, load_model
from fedexits.engine.inference import fold_batchnorm
from fedexits.engine.profiling import interleaved_medians_ms
from fedexits.engine.protocol import user_seed
from fedexits.fl.worker import get_worker
from fedexits.report.files import atomic_write_json
from fedexits.simulate import compose_config, prepare


def time_user(model, table, x, thresholds, repeats: int) -> dict:
    """Wall time of dynamic vs full inference over x, at batch 1 and as one batch."""
    full = model.num_exits
    table = ExitCosts.flops(table)  # once, not per call

    def one_by_one(fn):
        return lambda: [fn(x[i : i + 1]) for i in range(len(x))]

    with torch.no_grad():  # timed round-robin: a disturbance hits both paths alike
        milliseconds = interleaved_medians_ms(
            [
                one_by_one(lambda s: dynamic_inference(model, s, thresholds, table)),
                one_by_one(lambda s: model.forward_to_exit(s, full)),
                lambda: dynamic_inference(model, x, thresholds, table, batch_size=len(x)),
                lambda: model.forward_to_exit(x, full),
            ],
            repeats=repeats,
            warmup=1,
            max_seconds=float("inf"),
        )
    names = ("dynamic_b1_s", "full_b1_s", "dynamic_batch_s", "full_batch_s")
    return {name: ms / 1000 for name, ms in zip(names, milliseconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedexits.simulate")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a phone-like 1)")
    parser.add_argument(
        "--no-fold",
        action="store_true",
        help="time the training-form model (BatchNorm not folded into convs)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def deployed(model):
        """What runs on a device: BatchNorm folded into the convolutions (both paths alike)."""
        return model if args.no_fold else fold_batchnorm(model)

    prepared = prepare(compose_config(args.overrides))
    config = prepared.config
    worker = get_worker(json.dumps(config))  # the same per-user protocol as the Flower clients
    model, table = worker.model, prepared.cost_table
    global_exits = {k: v.clone() for k, v in load_model(config["checkpoint"])[0].exits.state_dict().items()}
    rows = []
    for user in prepared.users[: min(args.users, prepared.num_held_out)]:
        result = worker.personalise_user(user, global_exits)["result"]  # personalise + calibrate
        thresholds = [result["threshold"] if on else None for on in result["active_exits"]]
        data = worker.population.load_user(user, seed=user_seed(config["seed"], user))
        dynamic = dynamic_inference(model, data.test_x, thresholds, table)
        full = dynamic_inference(model, data.test_x, None, table)
        rows.append(
            {
                "user": user,
                "threshold": result["threshold"],
                "active_exits": result["active_exits"],
                "accuracy_dynamic": float((dynamic.predictions == data.test_y).float().mean()),
                "accuracy_full": float((full.predictions == data.test_y).float().mean()),
                "mflops_dynamic": dynamic.total_mflops,
                "mflops_full": full.total_mflops,
                **time_user(deployed(model), table, data.test_x, thresholds, args.repeats),
            }
        )
        r = rows[-1]
        print(
            f"{user}: threshold {r['threshold']:.2f}, accuracy {r['accuracy_dynamic']:.3f} vs "
            f"{r['accuracy_full']:.3f}, FLOP speedup {r['mflops_full'] / r['mflops_dynamic']:.2f}x, "
            f"wall {r['full_b1_s'] / r['dynamic_b1_s']:.2f}x (batch 1) "
            f"{r['full_batch_s'] / r['dynamic_batch_s']:.2f}x (one batch)"
        )

    total = {k: sum(r[k] for r in rows) for k in rows[0] if k.endswith("_s") or k.startswith("mflops")}
    flop_prediction = total["mflops_full"] / total["mflops_dynamic"]
    result = {
        "speedup_at_1pp": total["full_batch_s"] / total["dynamic_batch_s"],
        "speedup_at_1pp_batch1": total["full_b1_s"] / total["dynamic_b1_s"],
        "flop_predicted_speedup": flop_prediction,
        "wall_over_flop_prediction": total["full_batch_s"] / total["dynamic_batch_s"] / flop_prediction,
        "wall_over_flop_prediction_batch1": total["full_b1_s"] / total["dynamic_b1_s"] / flop_prediction,
        "accuracy_drop_pp": 100 * statistics.mean(r["accuracy_full"] - r["accuracy_dynamic"] for r in rows),
        "users": len(rows),
        "drop_tolerance_pp": float(config["personalisation"]["drop_tolerance_pp"]),
        "batchnorm_folded": not args.no_fold,
        "torch_threads": torch.get_num_threads(),
        "overrides": args.overrides,
        "per_user": rows,
    }
    atomic_write_json(result, args.json)
    for key in (
        "speedup_at_1pp",
        "speedup_at_1pp_batch1",
        "flop_predicted_speedup",
        "wall_over_flop_prediction",
        "wall_over_flop_prediction_batch1",
        "accuracy_drop_pp",
    ):
        print(f"{key:34s} {result[key]:7.3f}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
