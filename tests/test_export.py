"""ONNX export and the ONNX Runtime early-exit runner against the PyTorch model they come from."""

import json
import shutil

import onnx
import pytest
import torch

from fedexits.engine import (
    OnnxEarlyExit,
    dynamic_inference,
    exits_file,
    export_onnx,
    export_user,
    latency_costs,
    load_exits,
    profile_exit_latency,
    save_checkpoint,
    save_exits,
)
from fedexits.engine.export import MANIFEST, export_graph
from fedexits.errors import CheckpointError, SettingsError
from fedexits.models import build_multi_exit, cost_table

from .conftest import make_tiny_model, make_user

NUM_EXITS = 3
TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Export traces batches of 2: one torch thread avoids thread-pool overhead, which dominates
    on a busy machine. Outputs are compared with tolerances that hold for any thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    """Untrained tiny model with non-trivial BatchNorm statistics (so folding changes weights)
    and exits that differ from their initialisation (as after personalisation)."""
    model = make_tiny_model(num_exits=NUM_EXITS, pretrained=False)
    generator = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(0.5 + torch.randn(16, 1, 28, 28, generator=generator))
        for p in model.exits.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return make_user(n=48, seed=7)[0]


@pytest.fixture(scope="module")
def thresholds(model, images):
    """Per exit, the midpoint between two middle confidences (so samples split at every exit and
    none sits on a threshold); exit 1 off."""
    with torch.no_grad():
        confidence = torch.stack(model(images)[:-1]).softmax(-1).max(-1).values.sort(dim=1).values
    n = confidence.shape[1]
    mids = ((confidence[:, n // 3] + confidence[:, n // 3 + 1]) / 2).tolist()
    return [t if k != 1 else None for k, t in enumerate(mids)]


@pytest.fixture(scope="module")
def exports(model, thresholds, tmp_path_factory):
    """BatchNorm folded: through a checkpoint and an exits file (the deployment path);
    not folded: straight from the model."""
    root = tmp_path_factory.mktemp("exports")
    save_checkpoint(root / "global.pt", model)
    active = [t is not None for t in thresholds]
    threshold = max(t for t in thresholds if t is not None)
    per_user = [threshold if on else None for on in active]
    save_exits(exits_file(root, "u1"), model, threshold, active, user="u1")
    return {
        True: (export_user(root / "global.pt", exits_file(root, "u1"), root / "folded"), per_user),
        False: (export_onnx(model, root / "plain", thresholds, fold_bn=False), thresholds),
    }


@pytest.mark.parametrize("fold_bn", [True, False])
def test_every_graph_matches_pytorch(model, images, exports, fold_bn):
    manifest_path, thresholds = exports[fold_bn]
    runner = OnnxEarlyExit(manifest_path)
    manifest = runner.manifest
    assert manifest["batchnorm_folded"] is fold_bn and manifest["num_exits"] == NUM_EXITS
    assert manifest["thresholds"] == thresholds
    assert manifest["active_exits"] == [t is not None for t in thresholds]
    table = cost_table(model)
    assert [row["mflops"] for row in manifest["costs"]] == pytest.approx(table["mflops"].tolist())
    assert [row["params"] for row in manifest["costs"]] == table["params"].tolist()
    segment = onnx.load(runner.directory / manifest["graphs"]["segments"][0])
    assert segment.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # batch is symbolic
    if fold_bn:
        ops = {n.op_type for n in onnx.load(runner.directory / "truncated_3.onnx").graph.node}
        assert "BatchNormalization" not in ops and "Conv" in ops

    with torch.no_grad():
        expected = model(images)
        # batch_size 5 over 48 images: the dynamic batch dimension takes 5 and 3
        for k, logits in enumerate(runner.exit_logits(images, batch_size=5)):
            assert (logits - expected[k]).abs().max() < TOLERANCE, f"exit {k}"
        for k in range(NUM_EXITS + 1):
            truncated = runner.fixed_exit_inference(images, k, batch_size=32)
            assert (truncated - model.forward_to_exit(images, k)).abs().max() < TOLERANCE, f"truncated {k}"
        one = runner.fixed_exit_inference(images[:1], NUM_EXITS)
        assert (one - expected[-1][:1]).abs().max() < TOLERANCE


def assert_same_exits(out, reference, confidence, thresholds):
    """Same exit and prediction for every sample, except those whose confidence at an active
    exit is within TOLERANCE of its threshold (a rounding difference may tip them)."""
    near = torch.zeros(len(confidence[0]), dtype=torch.bool)
    for k, t in enumerate(thresholds):
        if t is not None:
            near |= (confidence[k] - t).abs() < TOLERANCE
    differ = (out.exit_taken != reference.exit_taken) | (out.predictions != reference.predictions)
    assert not (differ & ~near).any()
    same = ~differ
    assert torch.equal(out.mflops[same], reference.mflops[same])
    assert (out.confidence[same] - reference.confidence[same]).abs().max() < TOLERANCE


def test_runtime_dynamic_inference_matches_pytorch(model, images, thresholds, exports):
    runner = OnnxEarlyExit(exports[False][0])
    table = cost_table(model)
    with torch.no_grad():
        confidence = torch.stack(model(images)[:-1]).softmax(-1).max(-1).values
    reference = dynamic_inference(model, images, thresholds, table, batch_size=16)
    assert len(set(reference.exit_taken.tolist())) >= 3, "thresholds should spread the exits"
    # the manifest's exits: its stage graphs
    out = runner.dynamic_inference(images, batch_size=16)
    assert len(runner.manifest["graphs"]["stages"]) == sum(t is not None for t in thresholds) + 1
    assert_same_exits(out, reference, confidence, thresholds)
    assert out.exit_taken.dtype == torch.long and out.mflops.shape == (len(images),)
    # one image at a time (the lean path a device takes) gives the same answers
    singles = [runner.dynamic_inference(images[i : i + 1]) for i in range(len(images))]
    for field in ("predictions", "exit_taken", "mflops"):
        assert torch.equal(torch.cat([getattr(o, field) for o in singles]), getattr(out, field)), field
    # other exits: the per-attach-point segments and heads
    ordered = confidence[1].sort().values
    others = [None, float(ordered[len(ordered) // 2 : len(ordered) // 2 + 2].mean()), None]
    reference = dynamic_inference(model, images, others, table)
    out = runner.dynamic_inference(images, others, batch_size=7)
    assert_same_exits(out, reference, confidence, others)
    assert set(reference.exit_taken.tolist()) == {1, NUM_EXITS}

    no_exit = runner.dynamic_inference(images, thresholds=None)
    assert (no_exit.exit_taken == NUM_EXITS).all()
    full = runner.fixed_exit_inference(images, NUM_EXITS).argmax(1)
    assert torch.equal(no_exit.predictions, full)
    assert no_exit.total_mflops == pytest.approx(len(images) * table["mflops"].iloc[-1])


def test_exits_file_round_trip(model, exports, tmp_path):
    path = save_exits(tmp_path / "u.pt", model, 0.7, [True, False, True], user="u", accuracy=0.5)
    saved = load_exits(path)
    assert saved.thresholds() == [0.7, None, 0.7]
    assert saved.extra == {"user": "u", "accuracy": 0.5}
    assert all(torch.equal(v, model.exits.state_dict()[k]) for k, v in saved.state_dict.items())
    manifest = json.loads(exports[True][0].read_text())
    assert manifest["metadata"]["user"] == "u1" and manifest["metadata"]["exits_file"].endswith("u1.pt")


@pytest.mark.parametrize("runtime", ["onnxruntime", "eager"])
def test_profile_exit_latency(model, runtime):
    table = profile_exit_latency(model, runtime=runtime, batch_sizes=[1, 3], repeats=2)
    assert len(table) == 2 * (NUM_EXITS + 1) and set(table["runtime"]) == {runtime}
    assert (table[["latency_ms", "head_ms"]] > 0).all().all()
    costs = latency_costs(table, batch_size=3)
    assert len(costs.backbone) == len(costs.heads) == NUM_EXITS + 1


def test_dynamo_exporter_matches(model, tmp_path):
    """The torch.export-based exporter (the one left once TorchScript's is removed)."""
    head, features = (
        model.exits[0],
        torch.randn(3, *model.attach_point_features(torch.zeros(1, 1, 28, 28))[0].shape[1:]),
    )
    export_graph(head, features, tmp_path / "head.onnx", exporter="dynamo")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "head.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": features.numpy()})[0]
    with torch.no_grad():
        assert abs(out - head(features).numpy()).max() < TOLERANCE


# --- bad input: one clear line, nothing half-written -------------------------------------------


def only(path):
    return sorted(p.name for p in path.iterdir())


def test_missing_or_corrupt_exits_file(exports, tmp_path):
    checkpoint = exports[True][0].parent.parent / "global.pt"
    with pytest.raises(CheckpointError, match=r"^exits file .*nope\.pt does not exist$"):
        export_user(checkpoint, tmp_path / "nope.pt", tmp_path / "out")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"^exits file .*bad\.pt is not a file written by torch.save"):
        export_user(checkpoint, tmp_path / "bad.pt", tmp_path / "out")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04broken")  # a zip header, then nothing
    with pytest.raises(CheckpointError, match=r"^exits file .*cut\.pt is truncated or corrupt"):
        export_user(checkpoint, tmp_path / "cut.pt", tmp_path / "out")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="is not a fedexits exits file"):
        load_exits(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"^checkpoint .*missing\.pt does not exist$"):
        export_user(tmp_path / "missing.pt", tmp_path / "bad.pt", tmp_path / "out")
    assert only(tmp_path) == ["bad.pt", "cut.pt", "other.pt"]


def test_exits_for_another_number_of_exits_or_architecture(model, exports, tmp_path):
    checkpoint = exports[True][0].parent.parent / "global.pt"
    path = save_exits(tmp_path / "u.pt", model, 0.5, [True] * NUM_EXITS)
    tampered = torch.load(path, weights_only=True)
    tampered["active_exits"] = [True, True]
    torch.save(tampered, tmp_path / "two_flags.pt")
    with pytest.raises(CheckpointError, match=r"has 2 active_exits flags for 3 exits"):
        export_user(checkpoint, tmp_path / "two_flags.pt", tmp_path / "out")

    other = build_multi_exit(backbone="femnist_mobilenet_v2", width_mult=0.25, num_exits=2)
    save_exits(tmp_path / "other.pt", other, 0.5, [True, True])
    with pytest.raises(CheckpointError, match=r"another architecture \(num_exits: exits file 2 vs model 3\)"):
        export_user(checkpoint, tmp_path / "other.pt", tmp_path / "out")
    assert only(tmp_path) == ["other.pt", "two_flags.pt", "u.pt"]


def test_bad_thresholds_and_settings(model, exports, tmp_path):
    with pytest.raises(SettingsError, match=r"expected 3 thresholds \(one per early exit\), got 2"):
        export_onnx(model, tmp_path / "out", [0.5, 0.5])
    with pytest.raises(SettingsError, match="active_exits must be 3 booleans"):
        export_onnx(model, tmp_path / "out", 0.5, [True])
    with pytest.raises(
        SettingsError, match=r"exporter must be one of \['torchscript', 'dynamo'\], got 'jit'"
    ):
        export_onnx(model, tmp_path / "out", 0.5, exporter="jit")
    with pytest.raises(
        SettingsError, match=r"latency.runtime must be one of \['onnxruntime', 'eager'\], got 'tvm'"
    ):
        profile_exit_latency(model, runtime="tvm")
    with pytest.raises(SettingsError, match="providers .*'NoSuchExecutionProvider'.* are not available"):
        OnnxEarlyExit(exports[False][0], providers=["NoSuchExecutionProvider"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(SettingsError, match="exists and is not an ONNX export"):
        export_onnx(model, tmp_path / "taken")
    assert only(tmp_path) == ["taken"] and only(tmp_path / "taken") == ["notes.txt"]


def test_bad_manifest(exports, tmp_path):
    with pytest.raises(CheckpointError, match=r"^ONNX manifest .*manifest\.json does not exist$"):
        OnnxEarlyExit(tmp_path)
    copy = shutil.copytree(exports[False][0].parent, tmp_path / "copy")
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        OnnxEarlyExit(copy)
    (copy / MANIFEST).write_text(json.dumps({**manifest, "thresholds": [0.5, 0.5]}))
    with pytest.raises(CheckpointError, match=r"has 2 thresholds for 3 exits \(expected 3\)"):
        OnnxEarlyExit(copy)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    (copy / "exit_2.onnx").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"exit_2\.onnx does not match its checksum"):
        OnnxEarlyExit(copy)
    (copy / "exit_2.onnx").unlink()
    with pytest.raises(CheckpointError, match=r"exit_2\.onnx named in .* does not exist"):
        OnnxEarlyExit(copy)


def test_failed_export_keeps_the_previous_one(model, exports, monkeypatch, tmp_path):
    previous = shutil.copytree(exports[False][0].parent, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    calls = []

    def fail_on_third(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return export_graph(*args, **kwargs)

    monkeypatch.setattr("fedexits.engine.export.export_graph", fail_on_third)
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(model, previous, 0.9)
    assert only(tmp_path) == ["model"]  # no temporary directory left behind
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
