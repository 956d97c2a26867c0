"""Per-round client time of federated exit training: before (frozen features recomputed in every
round) and after (features kept across rounds in the client process), at the same local epochs.

Each variant does what a client does with a train message, Flower's transport aside: find its
worker from the plan JSON the message carries, turn the exits' arrays into tensors, get the
user's images, train the exits for the local epochs, turn them back into arrays. *before* is the
path until this change (`engine.personalise` with labels only and no guard, computing the frozen
features in the call); *after, cold* is the new path in a client's first round in a process,
*after, warm* in a later round. All three train on the same images with the same seed and give
the same update (checked). Also reported: where a round's time goes and the message sizes.
Timed round-robin on one torch thread (a virtual client's); prints ratios and writes JSON.

    python benchmarks/federated_rounds.py --json results/federated_rounds.json [--local-epochs 1 5]
"""

from __future__ import annotations

import argparse
import pickle
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedexits.engine import PersonalisationConfig, personalise
from fedexits.engine.features import FeatureStore, FrozenFeatures
from fedexits.engine.local_training import LocalTrainingConfig, train_exits_locally
from fedexits.engine.profiling import interleaved_medians_ms
from fedexits.errors import exits_2_on_bad_input
from fedexits.report.files import atomic_write_json
from fedexits.study import compose_config, get_worker, initial_exits, prepare, user_seed


@exits_2_on_bad_input
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedexits.simulate")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--local-epochs", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--clients", type=int, default=6, help="global users timed per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_intermixed_args()  # options anywhere among the Hydra overrides
    torch.set_num_threads(1)

    prepared = prepare(compose_config(["init=federated", *args.overrides]), progress=False)
    settings = prepared.plan.settings
    users = prepared.users[prepared.num_held_out :][: args.clients]
    arrays = ArrayRecord(initial_exits(prepared.plan, "federated"))

    results = {}
    for epochs in args.local_epochs:
        plan = replace(
            prepared.plan,
            settings=compose_config(["init=federated", *args.overrides, f"federated.local_epochs={epochs}"]),
        )
        plan_json = plan.to_json()
        worker = get_worker(plan_json)
        fed = plan.settings.federated
        local = {"epochs": epochs, "lr": fed.lr, "batch_size": fed.batch_size}

        def images(user, worker=worker):
            data = worker.population.load_user(user, label_fraction=1.0, seed=user_seed(settings.seed, user))
            return torch.cat([data.train_x, data.test_x]), torch.cat([data.train_y, data.test_y])

        def before(user, server_round=2, plan_json=plan_json, images=images, local=local):
            client = get_worker(plan_json[:-1] + plan_json[-1])  # a message brings its own copy of the plan
            client.load_exits(arrays.to_torch_state_dict())
            x, y = images(user)
            seed = user_seed(settings.seed, user, "round", server_round)
            config = PersonalisationConfig(alpha=1.0, beta=0.0, gamma=0.0, guard=False, seed=seed, **local)
            personalise(client.model, x, y, None, config)
            return ArrayRecord(client.model.exits.state_dict())

        def after(user, server_round=2, plan_json=plan_json):
            client = get_worker(plan_json[:-1] + plan_json[-1])
            update = client.train_user(user, arrays.to_torch_state_dict(), server_round)
            return ArrayRecord(update.exits)

        def cold(user, worker=worker, after=after):
            kept, worker.features = worker.features, FeatureStore(worker.features.budget_bytes / 2**20)
            try:
                return after(user)
            finally:
                worker.features = kept

        for user in users:  # the same update along every path; fills the store for `after` (warm)
            reference = before(user).to_torch_state_dict()
            for path in (cold, after):
                got = path(user).to_torch_state_dict()
                assert all(torch.equal(got[k], reference[k]) for k in reference), f"{path.__name__} differs"

        def every_client(path):
            return lambda: [path(user) for user in users]

        paths = {"before": before, "after_cold": cold, "after_warm": after}
        ms = interleaved_medians_ms(
            [every_client(p) for p in paths.values()],
            repeats=args.repeats,
            warmup=0,
            max_seconds=float("inf"),
        )
        per_client = {name: t / len(users) / 1000 for name, t in zip(paths, ms)}
        results[f"local_epochs_{epochs}"] = {
            **{f"{name}_s_per_client": t for name, t in per_client.items()},
            "before_over_after_warm": per_client["before"] / per_client["after_warm"],
            "before_over_after_cold": per_client["before"] / per_client["after_cold"],
            "breakdown_s_per_client": breakdown(worker, users, images, arrays, plan_json, local),
        }

    store = worker.features
    n_images = sum(len(images(u)[1]) for u in users)
    kept_images = sum(len(images(u)[1]) for u in users if u in store)
    result = {
        **results,
        "message_bytes": {
            "plan_json": len(plan_json.encode()),
            "exits_arrays": sum(len(a.data) for a in arrays.values()),
            "train_message_pickled": len(
                pickle.dumps(RecordDict({"arrays": arrays, "config": ConfigRecord({"plan": plan_json})}))
            ),
        },
        "feature_store": {
            "bytes_per_image": store.nbytes / max(kept_images, 1),
            "mb_per_client_mean": store.nbytes / 2**20 / max(len(store), 1),
            "budget_mb": store.budget_bytes / 2**20,
        },
        "setup": {
            "clients": len(users),
            "images_per_client_mean": n_images / len(users),
            "batch_size": plan.settings.federated.batch_size,
            "checkpoint": prepared.plan.checkpoint,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "overrides": args.overrides,
        },
    }
    atomic_write_json(result, args.json)
    for key, values in results.items():
        print(
            f"{key}: before {values['before_s_per_client'] * 1e3:.0f} ms, after cold "
            f"{values['after_cold_s_per_client'] * 1e3:.0f} ms, after warm "
            f"{values['after_warm_s_per_client'] * 1e3:.0f} ms per client round; "
            f"before/after warm {values['before_over_after_warm']:.2f}x "
            f"(target >= 3), before/after cold {values['before_over_after_cold']:.2f}x"
        )
        print(
            "  breakdown (ms):", {k: round(v * 1e3, 1) for k, v in values["breakdown_s_per_client"].items()}
        )
    print("message bytes:", result["message_bytes"])
    print("feature store:", {k: round(v, 1) for k, v in result["feature_store"].items()})
    print(f"wrote {args.json}")


def breakdown(worker, users, images, arrays, plan_json, local) -> dict:
    """Median time per client of each step of a round, measured apart."""
    steps = {
        "worker_lookup": lambda u: get_worker(plan_json[:-1] + plan_json[-1]),
        "arrays_to_tensors": lambda u: arrays.to_torch_state_dict(),
        "load_images": images,
        "frozen_features": lambda u: FrozenFeatures(worker.model, images(u)[0]),
        "train_on_kept_features": lambda u: _train(worker, u, local),
        "tensors_to_arrays": lambda u: ArrayRecord(worker.model.exits.state_dict()),
    }
    times = {}
    for name, step in steps.items():
        samples = []
        for user in users:
            started = time.perf_counter()
            step(user)
            samples.append(time.perf_counter() - started)
        times[name] = statistics.median(samples)
    times["frozen_features"] -= times["load_images"]
    return times


def _train(worker, user, local):
    features, labels, _ = worker.client_features(user)
    train_exits_locally(worker.model, features, labels, LocalTrainingConfig(**local))


if __name__ == "__main__":
    sys.exit(main())
