"""The paper's Fig. 6: what each exit costs to train and to run.

(a) Per user, training time of each exit alone and of all exits together (exit personalisation on
    the frozen backbone's cached features) against fine-tuning the whole network
    (`engine.finetune_full`), same images, epochs and batch size, timed round-robin.
(b) Inference time of the network truncated at each exit against that exit's FLOPs, with a
    linear fit (slope, intercept, R^2), in ONNX Runtime and in eager PyTorch
    (`engine.profile_exit_latency`, BatchNorm folded).

Prints the ratios and fits, writes JSON and a figure.

    python benchmarks/exit_costs_fig6.py --json results/fig6.json [--figure results/fig6.png]
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedexits.engine import (
    PersonalisationConfig,
    finetune_full,
    load_model,
    personalise,
    profile_exit_latency,
)
from fedexits.engine.losses import exit_loss
from fedexits.engine.personalise import batch_bounds, make_optimizer
from fedexits.engine.profiling import interleaved_medians_ms
from fedexits.errors import exits_2_on_bad_input
from fedexits.models import build_multi_exit, cost_table
from fedexits.report.files import atomic_save_figure, atomic_write_json

RUNTIMES = ("onnxruntime", "eager")


def train_exit_alone(model, k: int, x: torch.Tensor, y: torch.Tensor, config: PersonalisationConfig) -> None:
    """Exit k personalised on its own, the way `personalise` trains all exits: the frozen prefix
    up to exit k runs once (features cached), then `epochs` shuffled passes train the head.
    All images labelled and beta = 0, so the final classifier is not needed."""
    model.eval()
    with torch.no_grad():
        features = model.attach_point_features(x, stop_after_exit=k)[k]
    head = model.exits[k]
    optimizer = make_optimizer(head.parameters(), config)
    generator = torch.Generator().manual_seed(config.seed)
    weights = config.loss_weights()
    labelled = torch.ones(len(x), dtype=torch.bool)
    head.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=generator)
        f, t = features[order], y[order]
        for start, end in batch_bounds(len(x), config.batch_size):
            loss = exit_loss(head(f[start:end]), None, t[start:end], labelled[start:end], weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    head.eval()


def training_times(model, users, config: PersonalisationConfig, repeats: int) -> pd.DataFrame:
    """Per user: seconds to train each exit alone, all exits together and the whole network."""
    incoming = copy.deepcopy(model.state_dict())

    def fresh():
        model.load_state_dict(incoming)
        return model

    def train(method, *args):
        return lambda: method(fresh(), *args)

    rows = []
    for user, x, y in users:
        alone = [train(train_exit_alone, k, x, y, config) for k in range(model.num_exits)]
        together = [train(personalise, x, y, None, config), train(finetune_full, x, y, None, config)]
        ms = interleaved_medians_ms(alone + together, repeats=repeats, warmup=1, max_seconds=float("inf"))
        for k in range(model.num_exits):
            rows.append(dict(user=user, n_images=len(x), trained=f"exit {k}", seconds=ms[k] / 1000))
        rows.append(dict(user=user, n_images=len(x), trained="all exits", seconds=ms[-2] / 1000))
        rows.append(dict(user=user, n_images=len(x), trained="full network", seconds=ms[-1] / 1000))
        times = {r["trained"]: r["seconds"] for r in rows if r["user"] == user}
        print(
            f"{user} ({len(x)} images): full network {times['full network']:.2f} s, all exits "
            f"{times['all exits']:.2f} s ({times['full network'] / times['all exits']:.1f}x), "
            "each exit alone " + ", ".join(f"{times[f'exit {k}']:.2f}" for k in range(model.num_exits))
        )
    model.load_state_dict(incoming)
    return pd.DataFrame(rows)


def linear_fit(mflops: np.ndarray, ms: np.ndarray) -> dict:
    slope, intercept = np.polyfit(mflops, ms, 1)
    residual = ms - (slope * mflops + intercept)
    r2 = 1 - float((residual**2).sum()) / float(((ms - ms.mean()) ** 2).sum())
    return dict(slope_ms_per_mflop=float(slope), intercept_ms=float(intercept), r2=r2)


def inference_fits(model, batch_sizes: list[int], repeats: int, threads: int) -> tuple[pd.DataFrame, list]:
    """Per runtime and batch size: truncated-network latency per exit against its MFLOPs."""
    mflops = cost_table(model)["mflops"].to_numpy()
    tables, fits = [], []
    for runtime in RUNTIMES:
        table = profile_exit_latency(
            model, runtime=runtime, batch_sizes=batch_sizes, repeats=repeats, threads=threads
        )
        table["mflops"] = np.tile(mflops, len(batch_sizes))
        tables.append(table)
        for b, rows in table.groupby("batch_size"):
            ms = rows["per_sample_ms"].to_numpy()
            fit = dict(
                runtime=runtime, batch_size=int(b), full_ms_per_image=float(ms[-1]), **linear_fit(mflops, ms)
            )
            fit["latency_share"] = (ms / ms[-1]).tolist()
            fit["flops_share"] = (mflops / mflops[-1]).tolist()
            fits.append(fit)
    return pd.concat(tables, ignore_index=True), fits


def draw(training: pd.DataFrame, latency: pd.DataFrame, fits: list, path: Path) -> Path:
    """(a) training time per user; (b) latency vs MFLOPs with the fit, one panel per runtime;
    then both runtimes' per-exit latency as a share of the full network's against FLOPs."""
    figure = Figure(figsize=(5 * (2 + len(RUNTIMES)), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    ax_train, *ax_runtimes, ax_share = figure.subplots(1, 2 + len(RUNTIMES))
    order = list(dict.fromkeys(training["trained"]))
    medians = training.groupby("trained")["seconds"].median().reindex(order)
    ax_train.bar(range(len(order)), medians.to_numpy(), color=[f"C{i % 10}" for i in range(len(order))])
    for i, name in enumerate(order):
        values = training.loc[training["trained"] == name, "seconds"].to_numpy()
        ax_train.scatter(np.full(len(values), i), values, color="black", s=8, zorder=3)
    ax_train.set_xticks(range(len(order)), order, rotation=30, ha="right")
    ax_train.set_yscale("log")
    ax_train.set_ylabel("training time per user (s; bar: median, dots: users)")
    ax_train.set_title("(a) personalisation: exits vs whole network")
    batch = int(latency["batch_size"].min())
    for i, (runtime, axes) in enumerate(zip(RUNTIMES, ax_runtimes)):
        rows = latency[(latency["runtime"] == runtime) & (latency["batch_size"] == batch)]
        fit = next(f for f in fits if f["runtime"] == runtime and f["batch_size"] == batch)
        x, ms = rows["mflops"].to_numpy(), rows["per_sample_ms"].to_numpy()
        slope, intercept = fit["slope_ms_per_mflop"], fit["intercept_ms"]
        axes.scatter(x, ms, color=f"C{i}", zorder=3)
        label = f"{slope:.4f} ms/MFLOP + {intercept:.3f} ms, R²={fit['r2']:.3f}"
        axes.plot(x, slope * x + intercept, color=f"C{i}", label=label)
        axes.set_ylim(bottom=0)
        axes.set_xlabel("MFLOPs of the network truncated at the exit")
        axes.set_ylabel(f"latency per image (ms, batch {batch})")
        axes.set_title(f"(b) inference time vs FLOPs: {runtime}")
        axes.legend(fontsize=8)
        ax_share.plot(fit["flops_share"], fit["latency_share"], marker="o", color=f"C{i}", label=runtime)
    ax_share.plot([0, 1], [0, 1], color="grey", linestyle=":", label="latency share = FLOPs share")
    ax_share.set_xlabel("share of the full network's FLOPs")
    ax_share.set_ylabel("share of the full network's latency")
    ax_share.set_title(f"per-exit cost, batch {batch}")
    ax_share.legend(fontsize=8)
    return atomic_save_figure(figure, path)


def load_users(n: int, leaf: str | None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Held-out users' personalisation images: synthetic by default, real LEAF writers if given."""
    from fedexits.data import build_population

    if leaf:
        population = build_population({"source": "femnist_leaf", "path": leaf, "num_held_out": n})
    else:
        population = build_population({"source": "synthetic", "num_writers": n + 10, "num_held_out": n})
    users = []
    for user in population.held_out_users[:n]:
        data = population.load_user(user)
        users.append((user, data.train_x, data.train_y))
    return users


@exits_2_on_bad_input
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--figure", type=Path, help="PNG (default: the JSON path with .png)")
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="training repeats per user")
    parser.add_argument("--latency-repeats", type=int, default=50)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--checkpoint", help="a trained global model (default: random weights)")
    parser.add_argument("--leaf", help="LEAF folder for real writers (default: synthetic)")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.checkpoint:
        model, _ = load_model(args.checkpoint)
    else:
        torch.manual_seed(0)
        model = build_multi_exit(backbone="femnist_mobilenet_v2", width_mult=args.width, num_exits=6)
    model.eval()
    config = PersonalisationConfig(epochs=args.epochs, guard=False)  # time training, not the guard
    training = training_times(model, load_users(args.users, args.leaf), config, args.repeats)
    latency, fits = inference_fits(model, args.batch_sizes, args.latency_repeats, args.threads)

    medians = training.groupby("trained")["seconds"].median()
    exits = [f"exit {k}" for k in range(model.num_exits)]
    per_user = training.pivot(index="user", columns="trained", values="seconds")
    result = {
        "full_over_all_exits": float((per_user["full network"] / per_user["all exits"]).median()),
        "full_over_exit_alone": [float((per_user["full network"] / per_user[e]).median()) for e in exits],
        "all_exits_over_sum_of_exits_alone": float(
            (per_user["all exits"] / per_user[exits].sum(axis=1)).median()
        ),
        "median_seconds": {name: float(medians[name]) for name in [*exits, "all exits", "full network"]},
        "inference_fits": fits,
        "training": training.to_dict("records"),
        "latency": latency.to_dict("records"),
        "setup": {
            "model": f"femnist_mobilenet_v2 width {args.width}, {model.num_exits} exits",
            "checkpoint": args.checkpoint,
            "users": args.users,
            "data": args.leaf or "synthetic",
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "threads": args.threads,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "machine": platform.processor() or platform.machine(),
        },
    }
    atomic_write_json(result, args.json)
    figure = draw(training, latency, fits, args.figure or args.json.with_suffix(".png"))

    print(f"{'full network / all exits (median over users)':50s} {result['full_over_all_exits']:7.2f}")
    ratios = ", ".join(f"{r:.1f}" for r in result["full_over_exit_alone"])
    print(f"{'full network / each exit alone':50s} {ratios}")
    for fit in fits:
        shares = " ".join(f"{s:.3f}" for s in fit["latency_share"])
        print(
            f"{fit['runtime']:12s} batch {fit['batch_size']:3d}: "
            f"full {fit['full_ms_per_image']:.3f} ms/image, "
            f"{fit['slope_ms_per_mflop']:.4f} ms/MFLOP + {fit['intercept_ms']:.3f} ms, R^2 {fit['r2']:.3f}; "
            f"latency share per exit {shares}"
        )
    print("FLOPs share per exit        " + " ".join(f"{s:.3f}" for s in fits[0]["flops_share"]))
    eager = {f["batch_size"]: f["full_ms_per_image"] for f in fits if f["runtime"] == "eager"}
    for fit in (f for f in fits if f["runtime"] == "onnxruntime"):
        b = fit["batch_size"]
        print(f"eager / onnxruntime, full network, batch {b}: {eager[b] / fit['full_ms_per_image']:.2f}x")
    print(f"wrote {args.json} and {figure}")


if __name__ == "__main__":
    sys.exit(main())
