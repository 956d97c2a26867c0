"""Is a pruned network really cheaper to retrain and to run than the unpruned one?

For each pruning level (share of FLOPs removed), prunes a copy of the network's backbone and final
classifier (`prune_agnostic`: the architecture of a level is the same for every method and user),
then times, round-robin in one run, one training step (forward, backward, SGD step; batch 32,
BatchNorm in training mode, as retraining runs it) and one batch-1 inference (BatchNorm folded)
of the unpruned and of every pruned network. Prints the measured FLOPs against the configured
level and the time ratios, and writes JSON.

    python benchmarks/pruning_speed.py --json results/pruning_speed.json [--checkpoint MODEL.pt]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.fx.experimental.optimization import fuse

from fedexits.atomic import atomic_write
from fedexits.engine import PersonalisationConfig, PruningConfig, final_network, load_model, prune_sweep
from fedexits.engine.channel_pruning import FLOPS_TOLERANCE
from fedexits.engine.profiling import interleaved_medians_ms
from fedexits.errors import exits_2_on_bad_input
from fedexits.models import build_multi_exit


def training_step(network, x, y, optimizer) -> None:
    network.train()
    loss = F.cross_entropy(network(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.no_grad()
def infer(network, x) -> None:
    network(x)


@exits_2_on_bad_input
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--checkpoint", help="a trained global model (default: random weights)")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: one virtual client)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.checkpoint:
        model, _ = load_model(args.checkpoint)
    else:
        torch.manual_seed(0)
        model = build_multi_exit(backbone="femnist_mobilenet_v2", width_mult=args.width)
    model.eval()
    classes = model.spec.num_classes
    g = torch.Generator().manual_seed(0)
    # Timing depends on shapes, not pixels: random images stand in for a user's.
    x = torch.rand(args.batch_size, *model.input_shape, generator=g)
    y = torch.randint(0, classes, (args.batch_size,), generator=g)
    only_prune = PruningConfig(prune_retrain_epochs=0)
    pruned = prune_sweep(
        model, x, y, None, PersonalisationConfig(), only_prune, "prune_agnostic", args.levels
    )
    networks = [final_network(model)] + [result.network for result in pruned]

    steps = []
    for network in networks:
        optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.9)
        steps.append(functools.partial(training_step, network, x, y, optimizer))
    inference = [functools.partial(infer, fuse(network.eval()), x[:1]) for network in networks]
    times = interleaved_medians_ms(steps + inference, repeats=args.repeats, max_seconds=60)
    step_ms, latency_ms = times[: len(networks)], times[len(networks) :]

    rows = []
    for k, result in enumerate(pruned, start=1):
        target = (1 - result.prune_flops_fraction) * result.mflops_unpruned
        rows.append(
            {
                "level": result.prune_flops_fraction,
                "flops_removed": result.flops_removed,
                "flops_within_tolerance": abs(result.mflops - target) <= FLOPS_TOLERANCE * target,
                "channel_ratio": result.channel_ratio,
                "mflops": result.mflops,
                "params": result.params,
                "train_step_ms": step_ms[k],
                "train_step_speedup": step_ms[0] / step_ms[k],
                "latency_ms": latency_ms[k],
                "latency_speedup": latency_ms[0] / latency_ms[k],
                "flops_speedup": result.mflops_unpruned / result.mflops,
            }
        )
    out = {
        "unpruned": {
            "mflops": pruned[0].mflops_unpruned,
            "params": pruned[0].params_unpruned,
            "train_step_ms": step_ms[0],
            "latency_ms": latency_ms[0],
        },
        "levels": rows,
        "setup": {
            "model": f"{model.spec.backbone} width {model.spec.width_mult}, input {list(model.input_shape)}",
            "checkpoint": args.checkpoint,
            "batch_size": args.batch_size,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
        },
    }
    atomic_write(args.json, lambda f: json.dump(out, f, indent=2), "w")
    unpruned = out["unpruned"]
    step, batch1 = unpruned["train_step_ms"], unpruned["latency_ms"]
    print(f"unpruned: {unpruned['mflops']:.1f} MFLOPs, step {step:.1f} ms, batch 1 {batch1:.2f} ms")
    print(
        "level  removed  within10%  MFLOPs  step ms  step speedup  batch-1 ms  latency speedup  flops speedup"
    )
    for row in rows:
        print(
            f"{row['level']:5.2f}  {row['flops_removed']:7.3f}  {row['flops_within_tolerance']!s:>9}  "
            f"{row['mflops']:6.2f}  {row['train_step_ms']:7.1f}  {row['train_step_speedup']:12.2f}  "
            f"{row['latency_ms']:10.2f}  {row['latency_speedup']:15.2f}  {row['flops_speedup']:13.2f}"
        )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
