import json
import os
import runpy

import numpy as np
import pytest
import torch

from fedexits.data import DataError, build_population, leaf
from fedexits.data import cache as cache_module
from tests.data_helpers import write_leaf

WRITERS = {
    "f0001_01": (30, 4),
    "f0002_02": (25, 3),
    "f0003_03": (0, 12),
    "f0004_04": (40, 5),
    "f0005_05": (20, 0),
    "f0006_06": (35, 4),
}


@pytest.fixture
def leaf_dir(tmp_path):
    root = tmp_path / "leaf"
    expected = write_leaf(str(root), WRITERS)
    return root, expected


def run_cli(argv):
    script = os.path.join(os.path.dirname(__file__), "..", "data_prep", "leaf_to_cache.py")
    return runpy.run_path(script)["main"](argv)


def config(root, cache, **overrides):
    return {
        "source": "femnist_leaf",
        "path": str(root),
        "cache_dir": str(cache),
        "num_held_out": 2,
        "n_test": 8,
    } | overrides


def test_writers_merged_and_ink_bright(leaf_dir, tmp_path):
    root, expected = leaf_dir
    population = build_population(config(root, tmp_path / "cache"))
    assert sorted(population.user_counts) == sorted(WRITERS)
    for writer, images in expected.items():
        stored, labels = population.user_images(writer)
        assert len(labels) == sum(WRITERS[writer])  # LEAF train + test parts merged
        assert np.array_equal(stored, images)  # uint8, 1.0 = white became 0 = background
    user = population.load_user("f0004_04")
    assert (user.n_train, user.n_test) == (37, 8)
    assert float(user.train_x.max()) > 0.5 and float(user.train_x[..., 0, :].max()) == 0.0
    assert user.train_x.dtype == torch.float32 and int(user.train_y.max()) < 62


def test_held_out_users_not_in_global_pool(leaf_dir, tmp_path):
    root, _ = leaf_dir
    population = build_population(config(root, tmp_path / "cache", seed=3))
    assert len(population.held_out_users) == 2
    rows = set(population.global_train_set().rows.tolist())
    for user in population.held_out_users:
        span = population.cache.user_slice(user)
        assert rows.isdisjoint(range(span.start, span.stop))


def test_cache_reused_and_rebuilt_when_source_changes(leaf_dir, tmp_path, monkeypatch):
    root, _ = leaf_dir
    first = build_population(config(root, tmp_path / "cache"))
    calls = []
    real_convert = leaf.convert_leaf
    monkeypatch.setattr(leaf, "convert_leaf", lambda *a: calls.append(1) or real_convert(*a))
    second = build_population(config(root, tmp_path / "cache"))
    assert calls == [] and second.cache.path == first.cache.path
    write_leaf(str(root), WRITERS | {"f0007_07": (15, 2)}, seed=1)  # the source changed
    third = build_population(config(root, tmp_path / "cache"))
    assert calls == [1] and "f0007_07" in third.user_counts


def test_cache_follows_the_source_bytes_not_their_file_times(leaf_dir, tmp_path, monkeypatch):
    # a copied or touched folder (new times, same bytes) keeps its cache; same-size new bytes do not
    root, _ = leaf_dir
    first = build_population(config(root, tmp_path / "cache"))
    calls, hashed = [], []
    real_convert, real_sha256 = leaf.convert_leaf, cache_module._sha256
    monkeypatch.setattr(leaf, "convert_leaf", lambda *a: calls.append(1) or real_convert(*a))
    monkeypatch.setattr(cache_module, "_sha256", lambda f: hashed.append(f) or real_sha256(f))
    build_population(config(root, tmp_path / "cache"))
    assert calls == [] and hashed == []  # unchanged: one stat per file, nothing read
    files = sorted(str(f) for f in root.rglob("*.json"))
    for file in files:
        os.utime(file, ns=(1, 1))
    touched = build_population(config(root, tmp_path / "cache"))
    assert calls == [] and sorted(hashed) == files and touched.cache.path == first.cache.path
    text = open(files[0]).read()
    digit = text.index('"y": [') + len('"y": [')  # a label's first digit: same size, still valid
    with open(files[0], "w") as f:
        f.write(text[:digit] + ("2" if text[digit] == "1" else "1") + text[digit + 1 :])
    os.utime(files[0], ns=(1, 1))
    build_population(config(root, tmp_path / "cache"))
    assert calls == [1]


def test_converter_cli_fills_the_cache_build_population_uses(leaf_dir, tmp_path, capsys):
    root, _ = leaf_dir
    cache = tmp_path / "cache"
    assert run_cli([str(root), "--cache-dir", str(cache)]) == 0
    assert "writers: 6" in capsys.readouterr().out
    built = [name for name in os.listdir(cache) if name.startswith("femnist_leaf-")]
    assert len(built) == 1
    population = build_population(config(root, cache))
    assert population.cache.path == str(cache / built[0])
    assert run_cli([str(tmp_path / "nowhere"), "--cache-dir", str(cache)]) == 2
    assert "nowhere" in capsys.readouterr().err


def assert_nothing_cached(cache):
    leftovers = [n for n in os.listdir(cache) if not n.endswith(".lock")] if cache.exists() else []
    assert leftovers == []


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nowhere does not exist"):
        build_population(config(tmp_path / "nowhere", tmp_path / "cache"))


def test_wrong_layout(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no LEAF JSON in .*empty: expected train/\*\.json"):
        build_population(config(tmp_path / "empty", tmp_path / "cache"))


def test_truncated_json_names_the_file(leaf_dir, tmp_path):
    root, _ = leaf_dir
    broken = root / "test" / "all_data_1_niid_05_keep_0_test_9.json"
    broken.write_text(broken.read_text()[:500])
    with pytest.raises(DataError, match=r"corrupt LEAF JSON .*all_data_1_niid_05_keep_0_test_9\.json"):
        build_population(config(root, tmp_path / "cache"))
    assert_nothing_cached(tmp_path / "cache")


def test_not_leaf_json(leaf_dir, tmp_path):
    root, _ = leaf_dir
    (root / "train" / "all_data_0_niid_05_keep_0_train_9.json").write_text('{"hello": 1}')
    with pytest.raises(DataError, match="is not LEAF JSON"):
        build_population(config(root, tmp_path / "cache"))


def rewrite_writer(root, change):
    file = root / "train" / "all_data_0_niid_05_keep_0_train_9.json"
    data = json.loads(file.read_text())
    change(data["user_data"]["f0001_01"])
    file.write_text(json.dumps(data))


def test_label_outside_0_61_names_the_writer(leaf_dir, tmp_path):
    root, _ = leaf_dir
    rewrite_writer(root, lambda entry: entry["y"].__setitem__(3, 62))
    with pytest.raises(DataError, match="writer f0001_01 has label 62; FEMNIST labels are 0..61"):
        build_population(config(root, tmp_path / "cache"))
    assert_nothing_cached(tmp_path / "cache")


def test_wrong_image_size_names_the_writer(leaf_dir, tmp_path):
    root, _ = leaf_dir
    rewrite_writer(root, lambda entry: entry.__setitem__("x", [row[:700] for row in entry["x"]]))
    with pytest.raises(DataError, match="writer f0001_01: expected x of shape"):
        build_population(config(root, tmp_path / "cache"))


def test_unknown_user_and_too_few_images(leaf_dir, tmp_path):
    root, _ = leaf_dir
    population = build_population(config(root, tmp_path / "cache", min_images=22, num_held_out=1))
    with pytest.raises(DataError, match="unknown user 'f9999_99'"):
        population.load_user("f9999_99")
    assert population.dropped_users == ["f0003_03", "f0005_05"]
    with pytest.raises(DataError, match="user f0003_03 has 12 images; need at least 22"):
        population.load_user("f0003_03")


def test_small_user_holds_out_a_fraction(leaf_dir, tmp_path):
    root, _ = leaf_dir
    population = build_population(config(root, tmp_path / "cache", n_test=10))
    user = population.load_user("f0003_03")  # 12 images < 2 * n_test
    assert (user.n_train, user.n_test) == (6, 6)
    assert "only 12 images" in user.notes[0]
