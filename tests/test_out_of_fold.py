import copy

import pytest
import torch

from fedexits.engine import (
    OutOfFoldConfig,
    PersonalisationConfig,
    exit_probabilities,
    personalise_out_of_fold,
)
from fedexits.engine import out_of_fold as out_of_fold_module
from fedexits.engine.out_of_fold import assign_folds, guard_decisions
from fedexits.engine.risk_control import mcnemar_p_value, sign_flip_p_value
from fedexits.errors import SettingsError, UserDataError

from .conftest import make_tiny_model, make_user

FAST = PersonalisationConfig(epochs=3, lr=0.05, batch_size=16)


def test_each_fold_model_never_trained_on_the_images_it_gives_outputs_for(monkeypatch):
    model = make_tiny_model()
    x, y = make_user(n=40, seed=1, shift=2)
    calls = []
    train_exits = out_of_fold_module.train_exits

    def recording(model, source, index, *args):
        losses = train_exits(model, source, index, *args)
        calls.append((index.clone(), copy.deepcopy(model.exits.state_dict())))
        return losses

    monkeypatch.setattr(out_of_fold_module, "train_exits", recording)
    result = personalise_out_of_fold(model, x, y, config=FAST, out_of_fold=OutOfFoldConfig(folds=4))
    assert len(calls) == 5  # four fold models, then the deployed exits
    probe = make_tiny_model()
    for fold, (trained_on, state) in enumerate(calls[:4]):
        held_out = torch.nonzero(result.fold == fold).flatten()
        assert len(held_out) == 10 and set(trained_on.tolist()).isdisjoint(held_out.tolist())
        assert sorted(trained_on.tolist() + held_out.tolist()) == list(range(40))
        # the outputs recorded for these images are the ones of the model trained without them
        probe.exits.load_state_dict(state)
        expected = exit_probabilities(probe, x[held_out])
        torch.testing.assert_close(result.personalised_probs[:, held_out], expected, atol=1e-5, rtol=1e-4)
    assert calls[4][0].tolist() == list(range(40))  # deployed: trained on every image


def test_out_of_fold_outputs_do_not_know_memorised_labels():
    """Random labels: exits trained on an image learn its label by heart; out-of-fold outputs
    come from exits that never saw it and stay near chance (1/8). The first exit is the one the
    tiny model can make memorise (its last early exit cannot, with 1 or 2 threads)."""
    model = make_tiny_model()
    x, _ = make_user(n=24, seed=7)
    y = torch.randint(0, 8, (24,), generator=torch.Generator().manual_seed(3))
    config = PersonalisationConfig(epochs=100, lr=0.01, batch_size=8, guard=False, optimizer="adam")
    result = personalise_out_of_fold(model, x, y, config=config, out_of_fold=OutOfFoldConfig(folds=4))
    seen = (exit_probabilities(model, x)[0].argmax(-1) == y).float().mean()  # deployed, first exit
    unseen = (result.personalised_probs[0].argmax(-1) == y).float().mean()
    assert seen > 0.8 and unseen < 0.5, (seen, unseen)


def test_guard_keeps_only_exits_that_win_and_calibration_uses_what_is_deployed():
    model = make_tiny_model()
    incoming = copy.deepcopy(model.exits.state_dict())
    x, y = make_user(n=40, seed=5, shift=3)  # labels the shared exits get wrong: personalisation wins
    config = PersonalisationConfig(epochs=15, lr=0.05, batch_size=16)
    result = personalise_out_of_fold(model, x, y, config=config, out_of_fold=OutOfFoldConfig(folds=4))
    assert not all(result.guard_fired) and all(
        p <= 0.2 for p, f in zip(result.guard_p_values, result.guard_fired) if not f
    )
    for k, fired in enumerate(result.guard_fired):
        deployed = model.exits[k].state_dict()
        same = all(torch.equal(t, incoming[f"{k}.{name}"]) for name, t in deployed.items())
        assert same == fired
        source = result.shared_probs if fired else result.personalised_probs
        assert torch.equal(result.probs[k], source[k])
    assert torch.equal(result.probs[-1], result.shared_probs[-1])
    assert result.personalisation.n_train == 40 and result.seconds["total_s"] > 0


def test_same_seed_same_folds_and_outputs():
    x, y = make_user(n=30, seed=2, shift=1)
    runs = [
        personalise_out_of_fold(make_tiny_model(), x, y, config=PersonalisationConfig(epochs=2, seed=s))
        for s in (4, 4, 5)
    ]
    assert torch.equal(runs[0].fold, runs[1].fold) and torch.equal(runs[0].probs, runs[1].probs)
    assert not torch.equal(runs[0].fold, runs[2].fold)


def test_unlabelled_images_are_judged_against_the_final_exit():
    x, y = make_user(n=30, seed=2)
    unlabelled = torch.zeros(30, dtype=torch.bool)
    result = personalise_out_of_fold(make_tiny_model(), x, y, unlabelled, PersonalisationConfig(epochs=2))
    assert torch.equal(result.targets, result.shared_probs[-1].argmax(-1))


def test_folds_are_stratified_and_balanced():
    strata = torch.tensor([0] * 12 + [1] * 8 + [2] * 4)
    fold = assign_folds(strata, 4, seed=0)
    for c, per_fold in ((0, 3), (1, 2), (2, 1)):
        assert torch.bincount(fold[strata == c], minlength=4).tolist() == [per_fold] * 4
    assert torch.bincount(assign_folds(strata, 5, seed=0, stratify=False)).tolist() == [5, 5, 5, 5, 4]


def test_too_few_images_and_bad_settings():
    x, y = make_user(n=7)
    with pytest.raises(UserDataError, match="user has 7 personalisation images; 4-fold .* needs at least 8"):
        personalise_out_of_fold(make_tiny_model(), x, y, out_of_fold=OutOfFoldConfig(folds=4))
    with pytest.raises(SettingsError, match="out_of_fold.folds must be an integer >= 2, got 1"):
        OutOfFoldConfig(folds=1)
    with pytest.raises(SettingsError, match="out_of_fold.guard_test must be one of point, paired"):
        OutOfFoldConfig(guard_test="vibes")
    with pytest.raises(SettingsError, match=r"out_of_fold.guard_confidence must be in \(0, 1\)"):
        OutOfFoldConfig(guard_confidence=1.5)


def test_paired_tests():
    assert mcnemar_p_value(5, 0) == pytest.approx(1 / 32)
    assert mcnemar_p_value(3, 3) == pytest.approx(42 / 64)
    assert mcnemar_p_value(0, 0) == 1.0
    assert sign_flip_p_value(torch.ones(12)) < 0.01  # every sample improves
    assert sign_flip_p_value(torch.zeros(12)) == 1.0
    assert sign_flip_p_value(torch.tensor([1.0, -1.0] * 10)) > 0.3
    assert sign_flip_p_value(-torch.ones(12)) == 1.0


def one_hot(right, n_classes=4, confidence=0.7):
    probs = torch.full((len(right), n_classes), (1 - confidence) / (n_classes - 1))
    probs[torch.arange(len(right)), torch.where(torch.tensor(right), 0, 1)] = confidence
    return probs


def test_guard_decisions_by_test_and_metric():
    targets = torch.zeros(20, dtype=torch.long)
    shared = torch.stack([one_hot([False] * 20), one_hot([True] * 10 + [False] * 10)])
    better = torch.stack([one_hot([True] * 20), one_hot([True] * 11 + [False] * 9)])
    for metric in ("accuracy", "cross_entropy"):
        point, _ = guard_decisions(better, shared, targets, metric, test="point")
        paired, p_values = guard_decisions(better, shared, targets, metric, test="paired", confidence=0.9)
        # exit 0 wins on every image; exit 1 on one image only: the point rule keeps it, the test does not
        assert point == [True, True] and paired == [True, False]
        assert p_values[0] < 0.01 and p_values[1] > 0.1
