import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedexits.engine import dynamic_inference, exit_probabilities, fixed_exit_inference
from fedexits.models import cost_table

from .conftest import make_user


def test_dynamic_inference_agrees_with_per_exit_predictions(tiny_model):
    x, _ = make_user(n=50, seed=3)
    table = cost_table(tiny_model)
    probs = exit_probabilities(tiny_model, x)
    confidence, predictions = probs.max(-1)
    thresholds = [0.9, 0.6, 0.99, 0.5]
    out = dynamic_inference(tiny_model, x, thresholds, table, batch_size=16)
    for i in range(len(x)):
        passing = [k for k, t in enumerate(thresholds) if confidence[k, i] > t]
        expected_exit = passing[0] if passing else tiny_model.num_exits
        assert out.exit_taken[i] == expected_exit
        assert out.predictions[i] == predictions[expected_exit, i]
        assert out.confidence[i] == pytest.approx(confidence[expected_exit, i].item(), abs=1e-6)


def test_flops_spent_are_what_the_flop_counter_measures(tiny_model):
    x, _ = make_user(n=30, seed=4)
    table = cost_table(tiny_model)
    for thresholds in (0.0, 0.7, 1.0, [None, 0.5, None, 0.8]):
        with FlopCounterMode(display=False) as counter:
            out = dynamic_inference(tiny_model, x, thresholds, table, batch_size=30)
        assert out.total_mflops == pytest.approx(counter.get_total_flops() / 1e6, rel=1e-5)


def test_low_thresholds_spend_fewer_flops(tiny_model):
    x, _ = make_user(n=30, seed=4)
    table = cost_table(tiny_model)
    full = table["mflops"].iloc[-1] * len(x)
    eager = dynamic_inference(tiny_model, x, 0.0, table)
    assert (eager.exit_taken == 0).all()
    assert eager.total_mflops < 0.5 * full
    never = dynamic_inference(tiny_model, x, 1.0, table)  # heads run, nobody leaves
    assert (never.exit_taken == tiny_model.num_exits).all() and never.total_mflops > full
    off = dynamic_inference(tiny_model, x, None, table)  # no heads at all: the plain network
    assert off.total_mflops == pytest.approx(full)


def test_fixed_exit_mode_is_the_truncated_network(tiny_model):
    x, _ = make_user(n=8, seed=1)
    logits = tiny_model(x)
    for k in range(tiny_model.num_exits + 1):
        torch.testing.assert_close(fixed_exit_inference(tiny_model, x, k, batch_size=3), logits[k])
    with pytest.raises(ValueError, match="exit index"):
        fixed_exit_inference(tiny_model, x, tiny_model.num_exits + 1)


@pytest.mark.parametrize("bad", [-0.1, 1.5, [0.5, 0.5, 0.5, 2.0]])
def test_thresholds_outside_unit_interval_are_refused(tiny_model, bad):
    x, _ = make_user(n=4)
    with pytest.raises(ValueError, match=r"thresholds must be in \[0, 1\]"):
        dynamic_inference(tiny_model, x, bad, cost_table(tiny_model))


def test_wrong_number_of_thresholds_is_refused(tiny_model):
    with pytest.raises(ValueError, match="expected 4 thresholds"):
        dynamic_inference(tiny_model, make_user(n=4)[0], [0.5, 0.5], cost_table(tiny_model))


def test_folded_batchnorm_model_gives_the_same_outputs(tiny_model):
    from fedexits.engine.inference import fold_batchnorm

    x, _ = make_user(n=6, seed=2)
    folded = fold_batchnorm(tiny_model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    for a, b in zip(tiny_model(x), folded(x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    table = cost_table(tiny_model)
    same = dynamic_inference(folded, x, 0.5, table).exit_taken
    assert torch.equal(same, dynamic_inference(tiny_model, x, 0.5, table).exit_taken)
