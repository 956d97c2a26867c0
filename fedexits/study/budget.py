"""What produced each init's exits: samples processed and training FLOPs, and the federated
rounds as a table (accuracy against rounds and samples).

Counts are of what was done. Central training (`global`) counts every image of every step at
the FLOPs of its mode: `joint` trains the backbone, the final classifier and the exits together,
so all of it is counted (the exits cannot be had without it). Federated rounds count, for every
client that replied, `local_epochs` passes of its images through the exits' training on frozen
features, plus one frozen-feature pass per participation (what a device does when it takes part;
the simulation keeps features across rounds and computes fewer, reported apart). The backbone
under the federated and scratch exits comes from central training in every case.
"""

from __future__ import annotations

import pandas as pd

from .config import StudyConfig

CENTRAL_TRAINS = {"joint": "all", "exits_only": "exits", "exits_and_classifier": "exits_and_classifier"}
CENTRAL_WHAT = {
    "joint": "central, joint: backbone, final classifier and exits together",
    "exits_only": "central: exits on a frozen backbone",
    "exits_and_classifier": "central: exits and final classifier on a frozen backbone",
}
BUDGET_COLUMNS = ["init", "trained", "samples", "feature_passes", "tflops"]


def central_samples(images: int, epochs: int, batch_size: int) -> int:
    """Images through a training step in `train_global` (full batches only when there are more
    images than one batch)."""
    per_epoch = (images // batch_size) * batch_size if images > batch_size else images
    return epochs * per_epoch


def federated_frame(history: dict, flops_per_image: dict) -> pd.DataFrame:
    """One row per round (round 0: the random initial exits, evaluated only): clients, images,
    cumulative samples and training TFLOPs, train loss and the evaluation clients' mean accuracy
    per exit (the final exit last) with its mean over the early exits."""
    epochs = history["local_epochs"]
    rows = [
        {"round": 0, "clients": 0, "clients_ok": 0, "images": 0, "features_cached": 0, "train_loss": None}
    ]
    rows += [{k: v for k, v in row.items() if k != "users"} for row in history["rounds"]]
    frame = pd.DataFrame(rows)
    frame["samples"] = frame["images"] * epochs
    frame["samples_cumulative"] = frame["samples"].cumsum()
    step_flops = (
        frame["samples"] * flops_per_image["exit_heads"] + frame["images"] * flops_per_image["features"]
    )
    frame["tflops_cumulative"] = step_flops.cumsum() / 1e12
    evaluations = {int(r): e for r, e in history["evaluations"].items()}
    accuracies = {r: e["accuracy"] for r, e in evaluations.items()}
    num_exits = max((len(a) for a in accuracies.values()), default=0)
    frame["eval_clients"] = frame["round"].map(
        lambda r: evaluations[r]["clients"] if r in evaluations else None
    )
    for k in range(num_exits):
        frame[f"accuracy_exit_{k}"] = frame["round"].map(
            lambda r, k=k: accuracies[r][k] if r in accuracies else None
        )
    if num_exits:
        early = [f"accuracy_exit_{k}" for k in range(num_exits - 1)]
        frame["accuracy_early_exits"] = frame[early].astype(float).mean(axis=1, skipna=False)
    return frame


def budget_table(
    settings: StudyConfig, training: dict, flops_per_image: dict, federated: dict | None
) -> pd.DataFrame:
    """Per init: what trained its exits, the samples processed (image passes through a training
    step), the frozen-feature passes and the training TFLOPs."""
    rows = []
    inits = settings.init.inits
    if "global" in inits:
        central = settings.global_training
        samples = central_samples(training["images"], central.epochs, central.batch_size)
        rows.append(
            {
                "init": "global",
                "trained": f"{CENTRAL_WHAT[central.mode]} ({central.epochs} x {training['images']} images)",
                "samples": samples,
                "feature_passes": 0,
                "tflops": samples * flops_per_image[CENTRAL_TRAINS[central.mode]] / 1e12,
            }
        )
    if "federated" in inits and federated is not None:
        frame = federated_frame(federated, flops_per_image)
        rows.append(
            {
                "init": "federated",
                "trained": (
                    f"{federated['strategy']}: exits on the frozen backbone, "
                    f"{len(federated['rounds'])} rounds x "
                    f"{federated['clients_per_round']} clients x {federated['local_epochs']} local epochs"
                ),
                "samples": int(frame["samples"].sum()),
                "feature_passes": int(frame["images"].sum()),
                "tflops": float(frame["tflops_cumulative"].iloc[-1]),
            }
        )
    if "scratch" in inits:
        rows.append(
            {
                "init": "scratch",
                "trained": "nothing (random exits)",
                "samples": 0,
                "feature_passes": 0,
                "tflops": 0.0,
            }
        )
    return pd.DataFrame(rows, columns=BUDGET_COLUMNS)
