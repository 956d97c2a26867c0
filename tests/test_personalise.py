import math

import pytest
import torch
import torch.nn.functional as F

from fedexits.engine import (
    ExitLossWeights,
    PersonalisationConfig,
    exit_loss,
    finetune_final,
    finetune_full,
    personalise,
)
from fedexits.engine.losses import sdn_exit_weights

from .conftest import make_tiny_model, make_user


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_personalisation_changes_exits_only(tiny_model, user):
    x, y = user
    blocks, classifier, exits = (
        state(tiny_model.blocks),
        state(tiny_model.classifier),
        state(tiny_model.exits),
    )
    final_before = tiny_model(x)[-1]
    personalise(tiny_model, x, y, config=PersonalisationConfig(epochs=3, lr=0.05, guard=False))
    assert_same_state(blocks, state(tiny_model.blocks))  # incl. BatchNorm running statistics
    assert_same_state(classifier, state(tiny_model.classifier))
    assert torch.equal(final_before, tiny_model(x)[-1])  # the fail-safe is bit-identical
    changed = [not torch.equal(exits[k], v) for k, v in tiny_model.exits.state_dict().items()]
    assert all(changed[i] for i, k in enumerate(exits) if k.endswith("weight"))


def test_personalisation_improves_exits_on_learnable_user():
    model = make_tiny_model()
    x, y = make_user(n=64, seed=5, shift=3)  # labels the global model gets wrong
    x_test, y_test = make_user(n=64, seed=6, shift=3)

    def accuracy():
        return [(z.argmax(1) == y_test).float().mean().item() for z in model(x_test)[:-1]]

    before = accuracy()
    personalise(model, x, y, config=PersonalisationConfig(epochs=15, lr=0.05))
    after = accuracy()
    assert sum(after) / len(after) > sum(before) / len(before) + 0.3


def test_cached_and_uncached_personalisation_agree(user):
    x, y = user
    config = PersonalisationConfig(epochs=3, lr=0.05, seed=7)
    cached, uncached, partial = make_tiny_model(), make_tiny_model(), make_tiny_model()
    r1 = personalise(cached, x, y, config=config)
    r2 = personalise(uncached, x, y, config=config, cache=False)
    # a budget that holds exactly the deepest exit's features for the 32 training samples
    deepest = cached.backbone_features(x[:1])[0][-1]
    budget_mb = 32 * deepest.numel() * 4 / 2**20
    r3 = personalise(partial, x, y, config=config, cache_budget_mb=budget_mb)
    assert r1.cached_exits == list(range(cached.num_exits)) and r2.cached_exits == []
    assert r3.cached_exits == [cached.num_exits - 1]
    for other in (uncached, partial):
        for (name, a), b in zip(cached.exits.state_dict().items(), other.exits.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert r1.guard_fired == r2.guard_fired == r3.guard_fired


def test_same_seed_same_result_different_seed_differs(user):
    x, y = user
    runs = []
    for seed in (1, 1, 2):
        model = make_tiny_model()
        personalise(model, x, y, config=PersonalisationConfig(epochs=2, lr=0.05, guard=False, seed=seed))
        runs.append(torch.cat([p.flatten() for p in model.exit_parameters()]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_guard_restores_exits_that_do_not_improve(user):
    x, y = user
    model = make_tiny_model()
    incoming = state(model.exits)
    # a destructive learning rate: personalised exits are worse on validation, guard must fire
    result = personalise(model, x, y, config=PersonalisationConfig(epochs=3, lr=50.0, optimizer="sgd"))
    assert len(result.guard_fired) == model.num_exits and result.n_val == 8
    for k, fired in enumerate(result.guard_fired):
        head_now = model.exits[k].state_dict()
        head_then = {n[len(f"{k}.") :]: v for n, v in incoming.items() if n.startswith(f"{k}.")}
        assert all(torch.equal(head_now[n], head_then[n]) for n in head_then) == fired
    assert any(result.guard_fired)


def test_loss_terms_match_hand_computation():
    z_exit = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    z_final = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 1])
    labelled = torch.tensor([True, False])

    def lse(v):
        return math.log(sum(math.exp(a) for a in v))

    # alpha: CE of the labelled sample only (class 0 of [2,0,0]), averaged over the batch of 2
    ce0 = -(2.0 - lse([2.0, 0.0, 0.0]))
    got = exit_loss(z_exit, z_final, y, labelled, ExitLossWeights(alpha=1, beta=0, gamma=0))
    assert got.item() == pytest.approx(ce0 / 2)
    # gamma: the unlabelled sample against the final's top-1 (class 2) of [0,1,0]
    ce1 = -(0.0 - lse([0.0, 1.0, 0.0]))
    got = exit_loss(z_exit, z_final, y, labelled, ExitLossWeights(alpha=0, beta=0, gamma=1))
    assert got.item() == pytest.approx(ce1 / 2)
    # beta: T^2 * KL(final || exit) at temperature T, over both samples
    t = 2.0
    kl = 0.0
    for ze, zf in zip(z_exit.tolist(), z_final.tolist()):
        p = [math.exp(a / t - lse([b / t for b in zf])) for a in zf]
        q = [math.exp(a / t - lse([b / t for b in ze])) for a in ze]
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    got = exit_loss(z_exit, z_final, y, labelled, ExitLossWeights(alpha=0, beta=1, gamma=0, temperature=t))
    assert got.item() == pytest.approx(t * t * kl / 2)
    # weights combine linearly; labels and pseudo-labels never both on one sample
    got = exit_loss(z_exit, z_final, y, labelled, ExitLossWeights(alpha=0.5, beta=2, gamma=3, temperature=t))
    assert got.item() == pytest.approx(0.5 * ce0 / 2 + 3 * ce1 / 2 + 2 * t * t * kl / 2)


def test_sdn_weights_ramp_to_spread_caps():
    assert sdn_exit_weights(3, 0.0) == pytest.approx([0.01] * 3)
    assert sdn_exit_weights(3, 1.0) == pytest.approx([0.25, 0.5, 0.75])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(alpha=-1.0), "alpha must be >= 0"),
        (dict(beta=-0.1), "beta must be >= 0"),
        (dict(gamma=float("nan")), "gamma must be >= 0"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(epochs=-1), "epochs must be"),
        (dict(lr=0.0), "lr must be"),
        (dict(val_fraction=1.5), "val_fraction must be"),
        (dict(optimizer="rmsprop"), "optimizer must be"),
    ],
)
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        PersonalisationConfig(**overrides)


def test_all_zero_loss_is_refused(tiny_model, user):
    x, y = user
    with pytest.raises(ValueError, match="loss is zero for every sample"):
        personalise(tiny_model, x, y, alpha=0.0, beta=0.0, gamma=0.0)
    # all labelled + only the pseudo-label term: zero for every sample too
    with pytest.raises(ValueError, match="loss is zero for every sample"):
        personalise(tiny_model, x, y, alpha=0.0, beta=0.0, gamma=1.0)
    # no labels + only the label term
    none = torch.zeros(len(y), dtype=torch.bool)
    with pytest.raises(ValueError, match="loss is zero for every sample"):
        personalise(tiny_model, x, y, labelled=none, alpha=1.0, beta=0.0, gamma=0.0)


def test_bad_user_data_is_refused(tiny_model, user):
    x, y = user
    with pytest.raises(ValueError, match="user dataset is empty"):
        personalise(tiny_model, x[:0], y[:0])
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.61"):
        personalise(tiny_model, x, torch.full_like(y, 62))
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.61"):
        personalise(tiny_model, x, torch.full_like(y, -1))
    with pytest.raises(ValueError, match="model expects"):
        personalise(tiny_model, torch.rand(4, 3, 28, 28), y[:4])
    with pytest.raises(ValueError, match="guard needs at least 2"):
        personalise(tiny_model, x[:1], y[:1])


def test_unlabelled_user_trains_on_pseudo_labels(user):
    x, y = user
    model = make_tiny_model()
    before = state(model.exits)
    labelled = torch.zeros(len(y), dtype=torch.bool)
    result = personalise(model, x, y, labelled=labelled, config=PersonalisationConfig(epochs=2, guard=False))
    assert result.epoch_losses[0] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.exits.state_dict().items())
    # the pseudo-label loss does not depend on the (hidden) labels
    other = make_tiny_model()
    personalise(
        other, x, torch.zeros_like(y), labelled=labelled, config=PersonalisationConfig(epochs=2, guard=False)
    )
    assert_same_state(state(model.exits), state(other.exits))


def test_baselines_touch_what_they_claim(user):
    x, y = user
    model = make_tiny_model()
    blocks, exits = state(model.blocks), state(model.exits)
    finetune_final(model, x, y, config=PersonalisationConfig(epochs=2, lr=0.05))
    assert_same_state(blocks, state(model.blocks))
    assert_same_state(exits, state(model.exits))
    model = make_tiny_model()
    blocks = state(model.blocks)
    finetune_full(model, x, y, config=PersonalisationConfig(epochs=1, lr=0.05))
    assert any(
        not torch.equal(blocks[k], v) for k, v in model.blocks.state_dict().items() if k.endswith("weight")
    )
    # BatchNorm statistics stay frozen even in full fine-tuning
    assert all(torch.equal(blocks[k], v) for k, v in model.blocks.state_dict().items() if "running" in k)


def test_augmentation_disables_the_cache(user):
    x, y = user
    model = make_tiny_model()
    result = personalise(model, x, y, config=PersonalisationConfig(epochs=1, augment=True))
    assert result.cached_exits == []
    assert F.softmax(model(x)[0], 1).isfinite().all()


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_label_fraction_outside_unit_interval_is_refused(fraction):
    from fedexits.errors import SettingsError
    from fedexits.study import compose_config

    with pytest.raises(SettingsError, match=r"label_fraction must be in \[0, 1\]"):
        compose_config([f"personalisation.label_fraction={fraction}"])
