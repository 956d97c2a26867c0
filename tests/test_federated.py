"""Federated exit training, in process: local training on cached features, FedProx's proximal
term, which users evaluate and train, the training budget, and the settings."""

import importlib
from types import SimpleNamespace

import pytest
import torch

from fedexits.engine import PersonalisationConfig, personalise
from fedexits.engine.features import FeatureStore, FrozenFeatures
from fedexits.engine.local_training import LocalTrainingConfig, proximal_term, train_exits_locally
from fedexits.errors import SettingsError
from fedexits.models import cost_table
from fedexits.models.costs import training_flops
from fedexits.study import LatencyProfile, RunPlan, Worker, compose_config
from fedexits.study.budget import budget_table, central_samples, federated_frame
from fedexits.study.config import STRATEGIES, STRATEGY_PRESETS, FederatedConfig, StrategyConfig
from fedexits.study.plan import federated_clients

from .conftest import make_tiny_model, make_user

HELD_OUT, GLOBAL = ["h0", "h1"], ["g0", "g1", "g2"]


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


class RecordingPopulation:
    """Global and held-out users whose data loads are recorded."""

    held_out_users, global_users = HELD_OUT, GLOBAL

    def __init__(self):
        self.loaded: list[str] = []

    def load_user(self, user, label_fraction=1.0, seed=0):
        self.loaded.append(user)
        index = (HELD_OUT + GLOBAL).index(user)
        x, y = make_user(n=50, seed=index, shift=index)
        return SimpleNamespace(train_x=x[:35], train_y=y[:35], test_x=x[35:], test_y=y[35:])


def make_worker(*overrides) -> Worker:
    settings = compose_config(["federated.local_epochs=2", "federated.lr=0.05", *overrides])
    model = make_tiny_model()
    plan = RunPlan(settings, "unused.pt", model.spec.architecture(), LatencyProfile([1.0] * 5, [0.1] * 5))
    return Worker(plan, RecordingPopulation(), HELD_OUT + GLOBAL, model, cost_table(model))


def test_a_clients_features_kept_across_rounds_give_the_same_update():
    """Round 2 on a worker that kept the client's features from round 1 gives bit for bit the
    update a fresh worker (computing them) gives."""
    warm, cold = make_worker(), make_worker()
    exits = state(warm.model.exits)
    first = warm.train_user("g1", exits, server_round=1)
    assert not first.features_cached
    again = warm.train_user("g1", exits, server_round=2)
    fresh = cold.train_user("g1", exits, server_round=2)
    assert again.features_cached and not fresh.features_cached
    assert warm.population.loaded == ["g1"]  # the data was loaded once
    for name, tensor in fresh.exits.items():
        assert torch.equal(again.exits[name], tensor), name
    assert any(not torch.equal(exits[n], t) for n, t in again.exits.items())  # it did train
    assert again.num_examples == 50 and again.loss > 0  # all of the client's images


def test_local_training_on_cached_features_is_personalisation_with_labels_only():
    """The client's update equals the engine's personalisation path without guard (what rounds
    ran before the features were kept), and agrees with per-batch recomputation (no cache)."""
    x, y = make_user(n=45, seed=3, shift=2)
    config = LocalTrainingConfig(epochs=3, lr=0.05, batch_size=16, seed=7)
    start = make_tiny_model()
    results = {}
    for name in ("cached", "uncached"):
        model = make_tiny_model()
        train_exits_locally(model, FrozenFeatures(model, x, cache=name == "cached"), y, config)
        results[name] = state(model.exits)
    model = make_tiny_model()
    personalise(
        model,
        x,
        y,
        config=PersonalisationConfig(
            alpha=1, beta=0, gamma=0, epochs=3, lr=0.05, batch_size=16, guard=False, seed=7
        ),
    )
    results["personalise"] = state(model.exits)
    for name, tensor in results["cached"].items():
        assert torch.equal(results["personalise"][name], tensor), name
        assert torch.allclose(results["uncached"][name].float(), tensor.float(), atol=1e-4), name
    assert any(not torch.equal(t, results["cached"][n]) for n, t in state(start.exits).items())


def test_workers_sharing_a_feature_store_run_their_own_exits():
    """Features kept by one worker (another model object, the same backbone) serve another: the
    evaluation runs the caller's exits, not those of the model that computed the features."""
    first, second = make_worker(), make_worker()
    second.features = first.features
    trained = state(first.model.exits)
    random_exits = state(make_tiny_model(seed=3, pretrained=False).exits)
    _, with_trained = first.evaluate_exits("g0", trained)
    _, shared = second.evaluate_exits("g0", random_exits)
    _, alone = make_worker().evaluate_exits("g0", random_exits)
    assert shared == alone and shared != with_trained
    assert first.population.loaded == ["g0"] and not second.population.loaded


def test_the_proximal_term_keeps_local_exits_near_the_round_weights():
    x, y = make_user(n=48, seed=4, shift=5)
    distances = {}
    for mu in (0.0, 5.0):
        model = make_tiny_model()
        before = [p.detach().clone() for p in model.exit_parameters()]
        config = LocalTrainingConfig(epochs=4, lr=0.05, proximal_mu=mu)
        train_exits_locally(model, FrozenFeatures(model, x), y, config)
        distances[mu] = float(proximal_term(model.exit_parameters(), before, 2.0).detach())
    assert 0 < distances[5.0] < 0.8 * distances[0.0]
    params = [torch.ones(3), torch.zeros(2)]
    assert float(proximal_term(params, [torch.zeros(3), torch.ones(2)], mu=0.5)) == pytest.approx(0.25 * 5)


def test_the_feature_store_drops_the_least_recently_used_client_beyond_its_budget():
    model = make_tiny_model()
    x, y = make_user(n=30)
    one = FrozenFeatures(model, x)
    size_mb = (one.nbytes + y.numel() * y.element_size()) / 2**20
    store = FeatureStore(budget_mb=2.5 * size_mb)
    for user in ("a", "b", "a", "c"):  # a is used again before c arrives: b goes
        store.get(user, lambda: (FrozenFeatures(model, x), y))
    assert "a" in store and "c" in store and "b" not in store
    assert (store.hits, store.misses) == (1, 3)
    assert store.nbytes <= store.budget_bytes


def test_federated_evaluation_never_touches_held_out_users():
    """Evaluation and training clients are global users, disjoint, for any population and seed;
    a worker refuses to treat a held-out user as a federated client and never loads its data."""
    for held_out, num_global, seed in [(5, 11, 0), (250, 150, 3), (1, 2, 9), (40, 30, 1)]:
        n_eval = FederatedConfig().eval_clients(num_global)
        train, evaluation = federated_clients(held_out, num_global, n_eval, seed)
        assert min(train + evaluation) >= held_out and max(train + evaluation) < held_out + num_global
        assert not set(train) & set(evaluation) and len(train) + len(evaluation) == num_global
        assert len(evaluation) == n_eval >= 1 and train
    assert federated_clients(5, 11, 1, seed=0) == federated_clients(5, 11, 1, seed=0)
    worker = make_worker()
    exits = state(worker.model.exits)
    n, accuracies = worker.evaluate_exits("g0", exits)
    assert n == 50 and len(accuracies) == worker.model.num_exits + 1
    for held_out_user in HELD_OUT:
        with pytest.raises(ValueError, match="held out for personalisation"):
            worker.evaluate_exits(held_out_user, exits)
        with pytest.raises(ValueError, match="held out for personalisation"):
            worker.train_user(held_out_user, exits, server_round=1)
    assert worker.population.loaded == ["g0"]


def test_training_flops_count_forward_and_backward_of_what_trains():
    model = make_tiny_model()
    forward = float(cost_table(model)["mflops"].iloc[-1]) * 1e6
    heads_forward = float(cost_table(model)["head_mflops"].iloc[:-1].sum()) * 1e6
    joint, exits, heads = (training_flops(model, t) for t in ("all", "exits", "exit_heads"))
    assert 2.5 * (forward + heads_forward) < joint < 3.2 * (forward + heads_forward)  # forward + ~2x backward
    assert exits == pytest.approx(forward + heads, rel=0.01)  # frozen backbone: forward only
    assert 1.5 * heads_forward < heads < 3.2 * heads_forward
    before = state(model)
    training_flops(model, "all")
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())  # a copy trained


def test_the_budget_counts_what_each_init_did():
    settings = compose_config(["init=compare", "global_training.epochs=3", "global_training.batch_size=128"])
    flops = {"all": 100.0, "exits": 40.0, "exits_and_classifier": 41.0, "exit_heads": 6.0, "features": 35.0}
    history = {
        "strategy": "fedavg",
        "clients_per_round": 2,
        "local_epochs": 5,
        "rounds": [
            {
                "round": 1,
                "clients": 2,
                "clients_ok": 2,
                "images": 300,
                "features_cached": 0,
                "train_loss": 9.0,
            },
            {
                "round": 2,
                "clients": 2,
                "clients_ok": 1,
                "images": 100,
                "features_cached": 1,
                "train_loss": 8.0,
            },
        ],
        "evaluations": {
            0: {"clients": 3, "accuracy": [0.1, 0.2, 0.9]},
            2: {"clients": 3, "accuracy": [0.5, 0.7, 0.9]},
        },
    }
    table = budget_table(settings, {"images": 1000}, flops, history).set_index("init")
    assert central_samples(1000, 3, 128) == 3 * 896  # train_global drops the last partial batch
    assert table.loc["global", "samples"] == 3 * 896
    assert table.loc["global", "tflops"] == pytest.approx(3 * 896 * 100 / 1e12)
    assert table.loc["federated", "samples"] == 5 * 400 and table.loc["federated", "feature_passes"] == 400
    assert table.loc["federated", "tflops"] == pytest.approx((5 * 400 * 6 + 400 * 35) / 1e12)
    assert table.loc["scratch", "samples"] == 0
    frame = federated_frame(history, flops)
    assert list(frame["samples_cumulative"]) == [0, 1500, 2000]
    assert frame["accuracy_early_exits"].iloc[2] == pytest.approx(0.6)
    assert frame["accuracy_early_exits"].isna().tolist() == [False, True, False]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["federated/strategy=fedsgd"],
            "federated/strategy=fedsgd: no such option; available: fedadagrad, fedadam",
        ),
        (
            ["federated.strategy.name=fedsgd"],
            "federated.strategy.name must be one of fedavg, fedprox, fedadam",
        ),
        (
            ["federated/strategy=fedadam", "federated.strategy.server_lr=0"],
            "federated.strategy.server_lr must be > 0",
        ),
        (
            ["federated/strategy=fedyogi", "federated.strategy.server_lr=-0.1"],
            "federated.strategy.server_lr must be > 0, got -0.1",
        ),
        (
            ["federated/strategy=fedprox", "federated.strategy.proximal_mu=-1"],
            "federated.strategy.proximal_mu must be >= 0, got -1.0",
        ),
        (
            ["federated.strategy.proximal_mu=0.1"],
            "federated.strategy.proximal_mu applies to fedprox only, not fedavg",
        ),
        (["federated.strategy.server_lr=0.5"], "federated.strategy.server_lr applies to fedadam, fedyogi"),
        (["federated.rounds=0"], "federated.rounds must be an integer >= 1, got 0"),
        (["federated.local_epochs=0"], "federated.local_epochs must be an integer >= 1, got 0"),
        (["federated.clients_per_round=0"], "federated.clients_per_round must be an integer >= 1, got 0"),
        (["federated.eval_fraction=1"], "federated.eval_fraction must be in [0, 1), got 1.0"),
        (["federated.eval_every=0"], "federated.eval_every must be an integer >= 1, got 0"),
    ],
)
def test_each_bad_federated_setting_is_one_line(overrides, message):
    with pytest.raises(SettingsError) as error:
        compose_config(overrides)
    text = str(error.value)
    assert text.startswith(message) and "\n" not in text, text


def test_more_clients_per_round_than_the_global_population_is_refused_before_training(monkeypatch):
    """Refused, not clipped, before the global model trains (exit code 2 on the command line)."""
    prepare_module = importlib.import_module("fedexits.study.prepare")  # the package exports prepare()

    assert FederatedConfig().eval_clients(150) == 15
    with pytest.raises(
        SettingsError, match=r"clients_per_round must be <= 135 \(the 150 global users minus 15"
    ):
        FederatedConfig(clients_per_round=136).check_population(150)
    FederatedConfig(clients_per_round=135).check_population(150)
    population = SimpleNamespace(global_users=[f"g{i}" for i in range(11)], held_out_users=["h"])
    monkeypatch.setattr(prepare_module, "build_population", lambda config: population)
    monkeypatch.setattr(prepare_module, "train_global", lambda *a, **k: pytest.fail("trained"))
    settings = compose_config(["init=compare", "federated.clients_per_round=11"])
    with pytest.raises(SettingsError, match="clients_per_round must be <= 10 .* got 11"):
        prepare_module.prepare(settings, progress=False)


def test_every_strategy_has_a_preset_and_a_flower_class():
    from fedexits.fl.strategy import SEEDED_STRATEGIES

    assert tuple(SEEDED_STRATEGIES) == STRATEGIES == tuple(STRATEGY_PRESETS)
    for name in STRATEGIES:
        assert compose_config([f"federated/strategy={name}"]).federated.strategy == StrategyConfig(
            **STRATEGY_PRESETS[name]
        )
