"""Structured pruning + retraining per user (prune_data, prune_agnostic): real channel removal,
the FLOP target, data dependence of the importance, isolation from the shared model, seeds, and
one clear error per bad input."""

import json

import pytest
import torch

from fedexits.engine import PersonalisationConfig
from fedexits.engine.pruning import (
    PRUNING_METHODS,
    PruningConfig,
    evaluate_pruned,
    final_network,
    prune_agnostic,
    prune_data,
    prune_sweep,
)
from fedexits.errors import SettingsError, UserDataError
from fedexits.models import build_multi_exit, count_flops, count_params

from .conftest import make_tiny_model, make_user

FAST = PersonalisationConfig(epochs=1, batch_size=16)


def within_target(result) -> bool:
    target = (1 - result.prune_flops_fraction) * result.mflops_unpruned
    return abs(result.mflops - target) <= 0.1 * target


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", sorted(PRUNING_METHODS))
def test_pruned_network_is_smaller_runs_and_meets_the_flop_target(tiny_model, method):
    x, y = make_user(n=32, seed=1)
    result = PRUNING_METHODS[method](tiny_model, x, y, config=FAST)
    network = result.network
    unpruned = final_network(tiny_model)
    flops, logits = count_flops(network.eval(), x[:1])
    full_flops, _ = count_flops(unpruned, x[:1])
    assert flops == pytest.approx(result.mflops * 1e6)
    assert flops < 0.6 * full_flops and within_target(result)
    assert count_params(network) == result.params < 0.8 * count_params(unpruned)
    classes = tiny_model.spec.num_classes
    assert logits.shape == (1, classes)  # a plain module returning the final logits
    assert network(x).shape == (len(x), classes) and torch.isfinite(network(x)).all()
    assert result.method == method and result.n_train == len(x) and len(result.epoch_losses) == 1
    json.dumps(result.to_dict())  # plain data, without the network


def test_data_aware_importance_depends_on_the_data_agnostic_does_not(tiny_model):
    users = [make_user(n=40, seed=2), make_user(n=40, seed=3, shift=3)]
    no_retraining = PruningConfig(prune_retrain_epochs=0)
    aware = [prune_data(tiny_model, x, y, config=FAST, pruning=no_retraining) for x, y in users]
    agnostic = [prune_agnostic(tiny_model, x, y, config=FAST, pruning=no_retraining) for x, y in users]
    assert aware[0].pruned_channels.keys() == aware[1].pruned_channels.keys()
    assert aware[0].pruned_channels != aware[1].pruned_channels
    assert agnostic[0].pruned_channels == agnostic[1].pruned_channels
    assert aware[0].pruned_channels != agnostic[0].pruned_channels
    # Same architecture whichever channels were kept: equal FLOPs at equal level.
    assert {r.mflops for r in aware + agnostic} == {aware[0].mflops}


def test_retraining_changes_only_the_pruned_copy(tiny_model):
    x, y = make_user(n=32, seed=4, shift=2)
    labelled = torch.arange(len(x)) % 2 == 0
    shared = state(tiny_model)
    flags = [p.requires_grad for p in tiny_model.parameters()]
    trained = prune_data(tiny_model, x, y, labelled, FAST)
    finetune = PruningConfig(
        prune_importance="finetuned_magnitude", prune_finetune_epochs=1, prune_retrain_epochs=2
    )
    finetuned = prune_data(tiny_model, x, y, labelled, FAST, finetune)
    untrained = prune_data(tiny_model, x, y, labelled, FAST, PruningConfig(prune_retrain_epochs=0))
    assert same_state(state(tiny_model), shared)  # bit-identical, BatchNorm statistics included
    assert [p.requires_grad for p in tiny_model.parameters()] == flags
    assert not tiny_model.training
    assert trained.pruned_channels == untrained.pruned_channels
    assert not same_state(state(trained.network), state(untrained.network))
    assert trained.n_pseudo == int((~labelled).sum()) and finetuned.importance == "finetuned_magnitude"


def test_same_seed_same_pruned_network(tiny_model):
    x, y = make_user(n=32, seed=5)
    runs = [prune_data(tiny_model, x, y, config=FAST) for _ in range(2)]
    assert same_state(state(runs[0].network), state(runs[1].network))
    assert runs[0].epoch_losses == runs[1].epoch_losses
    other = prune_data(tiny_model, x, y, config=FAST, seed=1)
    assert not same_state(state(runs[0].network), state(other.network))


def test_sweep_reuses_one_ranking_across_levels(tiny_model):
    x, y = make_user(n=32, seed=6)
    levels = (0.25, 0.5, 0.75)
    results = prune_sweep(tiny_model, x, y, config=FAST, levels=levels)
    assert [r.prune_flops_fraction for r in results] == list(levels)
    assert all(within_target(r) for r in results)
    assert results[0].mflops > results[1].mflops > results[2].mflops
    # One ranking: a channel removed at a lower level is removed at every higher one.
    for low, high in zip(results, results[1:]):
        for layer, removed in low.pruned_channels.items():
            assert set(removed) <= set(high.pruned_channels[layer])
    assert len({r.importance_s for r in results}) == 1
    # A level of a sweep is exactly what a single prune at that level gives.
    single = prune_data(tiny_model, x, y, config=FAST, pruning=PruningConfig(prune_flops_fraction=0.5))
    assert same_state(state(single.network), state(results[1].network))


def test_evaluation_reports_accuracy_flops_and_latency(tiny_model):
    x, y = make_user(n=32, seed=7)
    x_test, y_test = make_user(n=20, seed=8)
    result = prune_agnostic(tiny_model, x, y, config=FAST)
    out = evaluate_pruned(result.network, x_test, y_test, reference=final_network(tiny_model), repeats=3)
    assert 0 <= out["accuracy"] <= 1 and out["mflops"] == pytest.approx(result.mflops)
    assert out["flops_speedup"] == pytest.approx(1 / (1 - result.flops_removed))
    assert out["latency_ms"] > 0 and out["reference_latency_ms"] > 0


def test_resnet18_prunes_and_runs():
    torch.manual_seed(0)
    model = build_multi_exit(backbone="resnet18", input_shape=(3, 32, 32), num_classes=10, num_exits=2).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 10, (12,), generator=g)
    result = prune_data(model, x, y, config=FAST)
    assert within_target(result) and result.params < 0.7 * count_params(final_network(model))
    assert result.network(x).shape == (12, 10)


@pytest.mark.parametrize("level", [0.0, 1.0, -0.2, 1.5])
def test_level_outside_zero_one_is_refused(level):
    with pytest.raises(SettingsError, match=r"personalisation.prune_flops_fraction must be in \(0, 1\)"):
        PruningConfig(prune_flops_fraction=level)


def test_bad_settings_and_data_give_one_line(tiny_model):
    x, y = make_user(n=16, seed=9)
    with pytest.raises(SettingsError, match="would remove every channel of"):
        prune_agnostic(tiny_model, x, y, config=FAST, pruning=PruningConfig(prune_flops_fraction=0.99))
    with pytest.raises(
        SettingsError, match=r"personalisation.prune_levels must be a list of shares in \(0, 1\)"
    ):
        prune_sweep(tiny_model, x, y, config=FAST, levels=(0.5, 1.0))
    with pytest.raises(SettingsError, match="personalisation.prune_importance must be"):
        PruningConfig(prune_importance="random")
    with pytest.raises(SettingsError, match="finetune_epochs"):
        prune_data(
            tiny_model, x, y, config=FAST, pruning=PruningConfig(prune_importance="finetuned_magnitude")
        )
    custom = make_tiny_model()
    custom.spec = type(custom.spec)(backbone="my_vit")
    with pytest.raises(SettingsError, match="backbone 'my_vit' cannot be pruned"):
        prune_data(custom, x, y, config=FAST)
    with pytest.raises(UserDataError, match="no personalisation images"):
        prune_data(tiny_model, x[:0], y[:0], config=FAST)
    nothing_labelled = torch.zeros(len(x), dtype=torch.bool)
    with pytest.raises(UserDataError, match="no labelled images"):
        prune_data(tiny_model, x, y, nothing_labelled, FAST, PruningConfig(prune_pseudo_labels=False))
    for error in (SettingsError, UserDataError):
        assert issubclass(error, ValueError)
