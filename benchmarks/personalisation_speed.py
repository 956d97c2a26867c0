"""How much cheaper is exit-only personalisation than the alternatives, on one FEMNIST-sized user?

Times (median of --repeats, in one run, timed round-robin): all-exit personalisation with the
frozen-feature cache, the same without cache (the paper's way: backbone recomputed every epoch), full-network
fine-tuning, and one forward pass of the plain network over the same images. Prints ratios and
writes JSON.

    python benchmarks/personalisation_speed.py --json results/personalisation_speed.json
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from pathlib import Path

import torch

from fedexits.engine import PersonalisationConfig, finetune_full, load_model, peak_memory_mb, personalise
from fedexits.engine.profiling import interleaved_medians_ms
from fedexits.errors import exits_2_on_bad_input
from fedexits.models import build_multi_exit, cost_table
from fedexits.report.files import atomic_write_json


def user_images(n: int, seed: int, source: str | None):
    """`n` FEMNIST-like images: the first writers of a LEAF folder if given, else the synthetic
    population (timing does not depend on the pixels, only on shapes)."""
    from fedexits.data import build_population

    if source:
        population = build_population({"source": "femnist_leaf", "path": source, "num_held_out": 1})
    else:
        population = build_population({"source": "synthetic", "num_writers": 20, "num_held_out": 1})
    xs, ys = [], []
    for user in population.global_users:
        data = population.load_user(user)
        xs.append(torch.cat([data.train_x, data.test_x]))
        ys.append(torch.cat([data.train_y, data.test_y]))
        if sum(len(x) for x in xs) >= n:
            break
    g = torch.Generator().manual_seed(seed)
    x, y = torch.cat(xs), torch.cat(ys)
    keep = torch.randperm(len(x), generator=g)[:n]
    return x[keep], y[keep]


@exits_2_on_bad_input
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--checkpoint", help="a trained global model (default: random weights)")
    parser.add_argument("--leaf", help="LEAF folder for real images (default: synthetic)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: what one virtual client gets)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.checkpoint:
        model, _ = load_model(args.checkpoint)
    else:
        torch.manual_seed(0)
        model = build_multi_exit(backbone="femnist_mobilenet_v2", width_mult=args.width, num_exits=6)
    model.eval()
    x, y = user_images(args.images, 0, args.leaf)
    config = PersonalisationConfig(epochs=args.epochs, guard=False, batch_size=args.batch_size)
    incoming = copy.deepcopy(model.state_dict())

    def fresh():
        model.load_state_dict(incoming)
        return model

    def forward():
        with torch.no_grad():
            model.forward_to_exit(x, model.num_exits)

    forward()  # warm-up of every code path before timing
    personalise(fresh(), x, y, config=config)
    # Timed round-robin, so a transient disturbance spreads over every ratio's both sides.
    measured = {
        "forward_s": forward,
        "personalise_s": lambda: personalise(fresh(), x, y, config=config),
        "personalise_uncached_s": lambda: personalise(fresh(), x, y, config=config, cache=False),
        "personalise_with_guard_s": lambda: personalise(fresh(), x, y, config=config, guard=True),
        "full_finetune_s": lambda: finetune_full(fresh(), x, y, config=config),
    }
    milliseconds = interleaved_medians_ms(
        list(measured.values()), repeats=args.repeats, warmup=0, max_seconds=float("inf")
    )
    times = {name: ms / 1000 for name, ms in zip(measured, milliseconds)}
    _, peak_mb = peak_memory_mb(lambda: personalise(fresh(), x, y, config=config))

    table = cost_table(model)
    forward_mflops = float(table["mflops"].iloc[-1])
    heads_mflops = float(table["head_mflops"].iloc[:-1].sum())
    floor = (forward_mflops + 3 * args.epochs * heads_mflops) / forward_mflops
    result = {
        **times,
        "full_finetune_over_personalise": times["full_finetune_s"] / times["personalise_s"],
        "uncached_over_cached": times["personalise_uncached_s"] / times["personalise_s"],
        "personalise_over_forward": times["personalise_s"] / times["forward_s"],
        "flop_floor_ratio": floor,
        "personalise_over_forward_vs_floor": times["personalise_s"] / times["forward_s"] / floor,
        "personalise_peak_memory_mb": peak_mb,
        "setup": {
            "images": len(x),
            "epochs": args.epochs,
            "batch_size": config.batch_size,
            "model": f"femnist_mobilenet_v2 width {args.width}, 6 exits",
            "forward_mflops_per_image": forward_mflops,
            "heads_mflops_per_image": heads_mflops,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
        },
    }
    atomic_write_json(result, args.json)
    for key in (
        "forward_s",
        "personalise_s",
        "personalise_uncached_s",
        "personalise_with_guard_s",
        "full_finetune_s",
    ):
        print(f"{key:28s} {result[key] * 1e3:9.1f} ms")
    targets = {
        "full_finetune_over_personalise": ">= 10",
        "uncached_over_cached": "",
        "personalise_over_forward": f"<= {1.25 * floor:.2f} (1.25 x floor)",
        "flop_floor_ratio": "",
    }
    for key, target in targets.items():
        print(f"{key:34s} {result[key]:7.2f}  {target}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
