"""The per-process worker that Flower clients and the in-process loop share."""

from types import SimpleNamespace

import pytest
import torch

from fedexits.engine import ExitCosts, PersonalisationConfig
from fedexits.engine.protocol import UserProtocol
from fedexits.fl.worker import Worker, personalisation_from_config
from fedexits.models import cost_table

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
    model = make_tiny_model()
    return Worker(
        config={"seed": 0, "personalisation": {"label_fraction": 1.0}, "simulation": {"latency_repeats": 1}},
        population=ShiftedUsers(),
        users=["1", "2"],
        model=model,
        cost_table=cost_table(model),
        personalisation=PersonalisationConfig(epochs=3, lr=0.05, guard=False),
        protocol=UserProtocol(method=method),
        _latency=ExitCosts([1.0, 2.0, 3.0, 4.0, 5.0], [0.1] * 5),
    )


@pytest.mark.parametrize("method", ["exits", "final", "full"])
def test_each_user_starts_from_the_shared_model(method):
    """A baseline that fine-tunes the backbone or the final classifier must not hand its weights
    to the next user that the same process serves."""
    worker = make_worker(method)
    exits = {k: v.clone() for k, v in worker.model.exits.state_dict().items()}
    first = worker.personalise_user("1", exits)["result"]
    after_first = worker.personalise_user("2", exits)["result"]
    alone = make_worker(method).personalise_user("2", exits)["result"]
    assert first["accuracy_after"] != first["accuracy_before"]  # the first user did change the model
    assert after_first["accuracy_before"] == alone["accuracy_before"]
    assert after_first["accuracy_after"] == alone["accuracy_after"]


def settings(**personalisation):
    return {"personalisation": {"alpha": 0.0, "beta": 0.0, **personalisation}, "simulation": {}}


@pytest.mark.parametrize("label_fraction", [1.0, 0.0])
def test_a_loss_that_is_zero_for_every_user_is_refused_before_the_run(label_fraction):
    gamma = 1.0 if label_fraction == 1.0 else 0.0  # gamma weighs only unlabelled samples
    with pytest.raises(ValueError, match=f"zero for every sample at label_fraction={label_fraction}"):
        personalisation_from_config(settings(gamma=gamma, label_fraction=label_fraction))


def test_pseudo_labels_alone_are_a_valid_objective():
    personalisation, _ = personalisation_from_config(settings(gamma=1.0, label_fraction=0.5))
    assert personalisation.alpha == 0.0 and personalisation.gamma == 1.0
