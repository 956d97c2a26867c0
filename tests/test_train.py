import pytest
import torch
from torch.utils.data import TensorDataset

from fedexits.engine import TrainConfig, load_model, measure_latency, peak_memory_mb, train_global
from fedexits.engine.checkpoint import read_checkpoint, save_checkpoint
from fedexits.engine.profiling import latency_costs
from fedexits.errors import CheckpointError
from fedexits.models import build_multi_exit

from .conftest import make_tiny_model, make_user


def fresh(num_exits=3):
    torch.manual_seed(0)
    return build_multi_exit(backbone="femnist_mobilenet_v2", width_mult=0.25, num_exits=num_exits)


def data(n=96):
    return TensorDataset(*make_user(n=n, seed=11))


class CrashingDataset(torch.utils.data.Dataset):
    """Serves `limit` samples, then fails: a run killed during its second epoch."""

    def __init__(self, base, limit):
        self.base, self.limit, self.served = base, limit, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.served += 1
        if self.served > self.limit:
            raise RuntimeError("power cut")
        return self.base[i]


def test_interrupted_and_resumed_training_equals_uninterrupted(tmp_path):
    config = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    straight = fresh()
    history = train_global(straight, data(), config, tmp_path / "a.pt", progress=False)
    assert len(history["epoch_loss"]) == 2
    path = tmp_path / "b.pt"
    with pytest.raises(RuntimeError, match="power cut"):
        train_global(fresh(), CrashingDataset(data(), limit=96 + 40), config, path, progress=False)
    resumed = fresh()
    resumed_history = train_global(resumed, data(), config, path, progress=False)
    assert resumed_history["epoch_loss"] == pytest.approx(history["epoch_loss"])
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, msg=k)
    # the checkpoint says what made its weights (a resumed run on other threads would add a line)
    cpu = torch.backends.cpu.get_cpu_capability()
    made_with = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}"]
    assert history["made_with"] == resumed_history["made_with"] == made_with
    assert read_checkpoint(path)["history"]["made_with"] == made_with


@pytest.mark.parametrize("threads", [1, 2])
def test_joint_training_lowers_the_loss_of_every_exit(threads):
    """Measured in evaluation mode, as the model is used. A short run at a high learning rate
    leaves BatchNorm's running statistics behind the weights, and then the outcome depends on
    floating-point reduction order (thread count, torch version); this run is long and gentle
    enough that every exit learns with a wide margin, with 1 or 2 threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = fresh()
        x, y = make_user(n=256, seed=2)
        x_new, y_new = make_user(n=256, seed=3)
        with torch.no_grad():
            before = [torch.nn.functional.cross_entropy(z, y).item() for z in model.eval()(x)]
        config = TrainConfig(epochs=10, batch_size=32, lr=0.01)
        train_global(model, TensorDataset(x, y), config, progress=False)
        with torch.no_grad():
            after = [torch.nn.functional.cross_entropy(z, y).item() for z in model(x)]
            final_accuracy = (model(x_new)[-1].argmax(1) == y_new).float().mean().item()
    finally:
        torch.set_num_threads(previous)
    assert all(a < b - 0.25 for a, b in zip(after, before)), (before, after)
    assert after[-1] < 0.5 * before[-1]
    assert final_accuracy > 0.8  # 8 classes: chance is 0.125


def test_exits_only_training_freezes_the_backbone():
    model = make_tiny_model(num_exits=4)
    backbone = {k: v.clone() for k, v in model.blocks.state_dict().items()}
    exits = {k: v.clone() for k, v in model.exits.state_dict().items()}
    train_global(model, data(), TrainConfig(mode="exits_only", epochs=1, batch_size=32), progress=False)
    assert all(torch.equal(backbone[k], v) for k, v in model.blocks.state_dict().items())
    assert any(not torch.equal(exits[k], v) for k, v in model.exits.state_dict().items())


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = make_tiny_model(num_exits=4)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, note="hello")
    loaded, checkpoint = load_model(path, spec=model.spec)
    assert checkpoint["note"] == "hello"
    x, _ = make_user(n=4)
    torch.testing.assert_close(loaded(x)[-1], model(x)[-1])
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left behind

    other = build_multi_exit(backbone="femnist_mobilenet_v2", width_mult=0.25, num_exits=3)
    with pytest.raises(CheckpointError, match=r"another architecture \(num_exits: checkpoint 4 vs model 3\)"):
        load_model(path, spec=other.spec)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(
        CheckpointError, match=r"is truncated or corrupt \(\w+\); delete it to train the model again$"
    ):
        load_model(corrupt)
    text = tmp_path / "notes.pt"
    text.write_text("not a model\n")
    with pytest.raises(
        CheckpointError, match="is not a file written by torch.save; delete it or give another path"
    ):
        load_model(text)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a fedexits checkpoint"):
        load_model(foreign)


def test_resuming_with_another_config_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    train_global(fresh(), data(), TrainConfig(epochs=1, batch_size=32), path, progress=False)
    with pytest.raises(CheckpointError, match="another training or data config"):
        train_global(fresh(), data(), TrainConfig(epochs=1, batch_size=32, lr=0.05), path, progress=False)


@pytest.mark.parametrize(
    "overrides, message",
    [(dict(mode="both"), "mode must be"), (dict(epochs=0), "epochs must be"), (dict(lr=-1.0), "lr must be")],
)
def test_bad_training_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)


def test_latency_profile_and_peak_memory(tiny_model):
    table = measure_latency(tiny_model, batch_sizes=(1, 4), repeats=3)
    assert len(table) == 2 * (tiny_model.num_exits + 1)
    assert (table["latency_ms"] > 0).all() and (table["head_ms"] > 0).all()
    # (no comparison of times: on a loaded machine any ordering can happen; benchmarks/ compare)
    costs = latency_costs(table, batch_size=1)
    assert len(costs.backbone) == tiny_model.num_exits + 1

    def work():
        a = torch.ones(64, 2**20)  # 256 MB
        b = a * 2  # +256 MB at the peak
        del b
        return a

    kept, peak = peak_memory_mb(work)
    assert peak == 512 and kept.shape == (64, 2**20)
