"""Every federated strategy through Flower's simulation engine (Ray), in one session: two rounds
each on a tiny population, the same seed twice, and what federated evaluation touches."""

from dataclasses import replace

import pytest
import torch

from fedexits.fl.runtime import run_with_clients
from fedexits.fl.server_app import federated_exits
from fedexits.study import compose_config, initial_exits, prepare

from .test_simulate import TINY

RUNS = {
    "fedavg": [],
    "fedprox": ["federated/strategy=fedprox", "federated.strategy.proximal_mu=0.1"],
    "fedadam": ["federated/strategy=fedadam"],
    "fedyogi": ["federated/strategy=fedyogi"],
    "fedadagrad": ["federated/strategy=fedadagrad"],
    "fedavg again": [],  # the same seed: features now kept from the first run in each client process
}
BASE = [
    "init=federated",
    "federated.eval_every=1",
    "federated.local_epochs=2",
    "federated.lr=0.05",
    "simulation.registration_timeout_s=1800",  # 16 virtual clients start slowly on a loaded machine
]


@pytest.fixture(scope="module")
def flower_runs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    prepared = prepare(compose_config([*TINY, *BASE, f"cache_dir={cache}"]), progress=False)

    def variant(extra):
        settings = compose_config([*TINY, *BASE, f"cache_dir={cache}", *extra])
        return replace(prepared, plan=replace(prepared.plan, settings=settings))

    def work(grid, node_of):
        return {name: federated_exits(grid, variant(extra), node_of) for name, extra in RUNS.items()}

    return prepared, run_with_clients(prepared, work)


@pytest.mark.parametrize("name", list(RUNS))
def test_each_strategy_trains_the_exits_for_two_rounds(flower_runs, name):
    prepared, runs = flower_runs
    exits, history = runs[name]
    start = initial_exits(prepared.plan, "federated")
    assert exits.keys() == start.keys()
    weights = [k for k in exits if k.endswith("weight")]
    assert all(torch.isfinite(exits[k]).all() for k in weights)
    assert all(not torch.equal(exits[k], start[k]) for k in weights), "some exit did not change"
    assert all(exits[k].dtype == start[k].dtype for k in exits)
    assert all((exits[k] > 0).all() for k in exits if k.endswith("running_var"))
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    assert all(r["clients_ok"] == r["clients"] == 3 for r in history["rounds"]) and not history["failures"]
    assert sorted(history["evaluations"]) == [0, 1, 2]  # round 0: the initial exits


def test_the_same_seed_gives_identical_federated_exits(flower_runs):
    """Identical although the second run's clients kept their features from the first run."""
    _, runs = flower_runs
    (first, first_history), (again, again_history) = runs["fedavg"], runs["fedavg again"]
    for name, tensor in first.items():
        assert torch.equal(again[name], tensor), name
    assert first_history["evaluations"] == again_history["evaluations"]
    assert sum(r["features_cached"] for r in again_history["rounds"]) > 0
    assert not any(torch.equal(first[k], runs["fedadam"][0][k]) for k in first if k.endswith("weight"))


def test_federated_evaluation_runs_on_global_users_that_never_train(flower_runs):
    prepared, runs = flower_runs
    _, history = runs["fedavg"]
    held_out = set(prepared.users[: prepared.num_held_out])
    evaluators = set(history["eval_users"])
    assert evaluators and not evaluators & held_out
    assert evaluators <= set(prepared.users[prepared.num_held_out :])
    assert history["train_clients"] + len(evaluators) == len(prepared.users) - prepared.num_held_out
    trained = {user for r in history["rounds"] for user in r["users"]}
    assert trained and not trained & evaluators and not trained & held_out
    assert history["reference"]["clients"] == len(evaluators)
    reference, start = history["reference"]["accuracy"], history["evaluations"][0]["accuracy"]
    assert len(reference) == len(start) == prepared.plan.architecture["num_exits"] + 1
    assert reference != start  # central and random exits were both evaluated, on the same clients:
    assert reference[-1] == start[-1]  # the final exit is frozen, the same for any exits
