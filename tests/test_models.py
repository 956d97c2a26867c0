import pytest
import torch
from torchvision import models as tvm

from fedexits.errors import CheckpointError
from fedexits.models import build_multi_exit, cost_table, count_flops, place_exits
from fedexits.models.backbones import split_mobilenet_v2, split_resnet
from fedexits.models.costs import block_flops


def tiny_model(**kw):
    torch.manual_seed(0)
    return build_multi_exit(backbone="femnist_mobilenet_v2", width_mult=0.25, **kw)


@pytest.mark.parametrize("num_exits", [1, 3, 6, 10])
def test_exits_sit_near_equidistant_flop_fractions(num_exits):
    model = tiny_model(num_exits=num_exits)
    flops, classifier_flops, _ = block_flops(model.blocks, model.classifier, model.input_shape)
    total = sum(flops) + classifier_flops
    largest_block = max(flops) / total
    cumulative = [sum(flops[: j + 1]) / total for j in model.exit_after]
    assert list(model.exit_after) == sorted(set(model.exit_after))  # distinct, increasing
    for i, fraction in enumerate(cumulative):
        # the nearest block boundary is less than one block's share away from the target
        assert abs(fraction - (i + 1) / (num_exits + 1)) <= largest_block


def test_place_exits_is_optimal_on_a_known_profile():
    # ten equal blocks: cumulative 0.1..1.0; 4 exits want 0.2, 0.4, 0.6, 0.8
    cumulative = [(j + 1) / 10 for j in range(10)]
    assert place_exits(cumulative, 4) == [1, 3, 5, 7]
    # crowded: as many exits as attachable blocks -> every block once
    assert place_exits(cumulative, 9) == list(range(9))


@pytest.mark.parametrize("bad", [0, -1, 19])
def test_bad_number_of_exits_is_refused(bad):
    with pytest.raises(ValueError, match="exits"):
        tiny_model(num_exits=bad)


def test_forward_returns_every_exit_and_features():
    model = tiny_model().eval()
    x = torch.rand(3, 1, 28, 28)
    logits, features = model(x, return_features=True)
    assert len(logits) == model.num_exits + 1 and len(features) == model.num_exits
    assert all(z.shape == (3, 62) for z in logits)
    for k in range(model.num_exits + 1):  # truncated network agrees with the joint forward
        torch.testing.assert_close(model.forward_to_exit(x, k), logits[k])


@pytest.mark.parametrize(
    "make, split",
    [
        (lambda: tvm.resnet18(num_classes=10), split_resnet),
        (lambda: tvm.mobilenet_v2(num_classes=10), split_mobilenet_v2),
    ],
)
def test_split_backbones_reproduce_torchvision(make, split):
    torch.manual_seed(0)
    net = make().eval()
    blocks, classifier = split(net)
    x = torch.rand(2, 3, 64, 64)
    h = x
    for block in blocks:
        h = block(h)
    torch.testing.assert_close(classifier(h), net(x))


def test_cost_table_is_cumulative_and_counts_heads():
    model = tiny_model()
    table = cost_table(model)
    assert list(table["exit"]) == list(range(model.num_exits + 1))
    assert table["backbone_mflops"].is_monotonic_increasing
    early = table.iloc[:-1]
    assert early["mflops"].to_numpy() == pytest.approx(
        (early["backbone_mflops"] + early["head_mflops"]).to_numpy()
    )
    assert (table["dynamic_mflops"].diff().iloc[1:] > 0).all()
    # the final row equals one full forward as counted by torch's flop counter
    flops, _ = count_flops(lambda x: model.forward_to_exit(x, model.num_exits), torch.zeros(1, 1, 28, 28))
    assert table["mflops"].iloc[-1] == pytest.approx(flops / 1e6)
    # params to the final exit = the backbone without any head
    backbone_params = sum(p.numel() for p in model.blocks.parameters()) + sum(
        p.numel() for p in model.classifier.parameters()
    )
    assert table["params"].iloc[-1] == backbone_params
    assert table["head_params"].iloc[0] == sum(p.numel() for p in model.exits[0].parameters())


def test_resnet50_builds_with_six_exits_at_imagenet_size():
    model = build_multi_exit(backbone="resnet50", num_classes=10, width_mult=None)
    assert model.num_exits == 6 and model.input_shape == (3, 224, 224)
    table = cost_table(model)
    assert 7000 < table["mflops"].iloc[-1] < 9000  # ~4.1 GMACs = ~8.2 GFLOPs


def test_missing_or_corrupt_backbone_weights_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        tiny_model(weights=str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        tiny_model(weights=str(bad))
