"""The per-process worker that Flower clients and the in-process loop share."""

from types import SimpleNamespace

import pytest
import torch

from fedexits.errors import SettingsError
from fedexits.models import cost_table
from fedexits.study import LatencyProfile, RunPlan, Worker, compose_config

from .conftest import make_tiny_model, make_user


class ShiftedUsers:
    """Users whose labels the tiny model gets wrong until it is personalised."""

    def load_user(self, user, label_fraction=1.0, seed=0):
        x, y = make_user(n=60, seed=int(user), shift=int(user))
        return SimpleNamespace(
            train_x=x[:40],
            train_y=y[:40],
            labelled=torch.ones(40, dtype=torch.bool),
            test_x=x[40:],
            test_y=y[40:],
            n_train=40,
            notes=[],
        )


def make_worker(method: str) -> Worker:
    settings = compose_config(
        [
            f"personalisation.method={method}",
            "personalisation.epochs=3",
            "personalisation.lr=0.05",
            "personalisation.guard=false",
        ]
    )
    model = make_tiny_model()
    latency = LatencyProfile([1.0, 2.0, 3.0, 4.0, 5.0], [0.1] * 5)
    plan = RunPlan(settings, checkpoint="unused.pt", architecture=model.spec.architecture(), latency=latency)
    return Worker(plan, ShiftedUsers(), ["1", "2"], model, cost_table(model))


@pytest.mark.parametrize("method", ["exits", "final", "full"])
def test_each_user_starts_from_the_shared_model(method):
    """A baseline that fine-tunes the backbone or the final classifier must not hand its weights
    (or its random state) to the next user that the same process serves: the second user's
    personalised model is bit-identical to the one a fresh worker makes for it."""
    worker = make_worker(method)
    exits = {k: v.clone() for k, v in worker.model.exits.state_dict().items()}
    first = worker.personalise_user("1", exits, "global").result
    worker.personalise_user("2", exits, "global")
    after_first = {k: v.clone() for k, v in worker.model.state_dict().items()}
    alone = make_worker(method)
    alone.personalise_user("2", exits, "global")
    assert first.accuracy_after != first.accuracy_before  # the first user did change the model
    for name, tensor in alone.model.state_dict().items():
        assert torch.equal(after_first[name], tensor), name


@pytest.mark.parametrize("label_fraction", [1.0, 0.0])
def test_a_loss_that_is_zero_for_every_user_is_refused_before_the_run(label_fraction):
    gamma = 1.0 if label_fraction == 1.0 else 0.0  # gamma weighs only unlabelled samples
    overrides = ["personalisation.alpha=0", "personalisation.beta=0", f"personalisation.gamma={gamma}"]
    with pytest.raises(SettingsError, match=f"zero for every sample at label_fraction={label_fraction}"):
        compose_config(overrides + [f"personalisation.label_fraction={label_fraction}"])


def test_pseudo_labels_alone_are_a_valid_objective():
    settings = compose_config(
        ["personalisation.alpha=0", "personalisation.beta=0", "personalisation.label_fraction=0.5"]
    )
    assert settings.personalisation.alpha == 0.0 and settings.personalisation.gamma == 1.0
