import os
import runpy

import numpy as np
import pytest

from fedexits.data import DataError, build_population, hub
from tests.data_helpers import write_hub_parquet

WRITERS = {"f0100_10": 30, "f0101_11": 24, "f0102_12": 36, "f0103_13": 18}


def run_cli(argv):
    script = os.path.join(os.path.dirname(__file__), "..", "data_prep", "femnist_hub_to_cache.py")
    return runpy.run_path(script)["main"](argv)


def config(path, cache, **overrides):
    return {
        "source": "femnist_hub",
        "path": path,
        "cache_dir": str(cache),
        "num_held_out": 1,
        "n_test": 6,
    } | overrides


@pytest.fixture
def parquet(tmp_path):
    path = tmp_path / "femnist.parquet"
    expected = write_hub_parquet(str(path), WRITERS)
    return path, expected


def test_writers_grouped_and_polarity_fixed(parquet, tmp_path):
    path, expected = parquet
    population = build_population(config(str(path), tmp_path / "cache"))
    assert sorted(population.user_counts) == sorted(WRITERS)
    for writer, images in expected.items():
        stored, labels = population.user_images(writer)
        assert np.array_equal(stored, images)  # dark-on-white rows were inverted to ink bright
        assert labels.min() >= 0 and labels.max() < 62
    assert population.cache.info["inverted"] == sum(WRITERS.values())
    user = population.load_user(population.held_out_users[0])
    assert user.n_test == 6 and user.train_x.shape[1:] == (1, 28, 28)
    assert set(population.global_users).isdisjoint(population.held_out_users)


def test_ink_bright_images_are_kept_and_folders_of_files_work(tmp_path):
    folder = tmp_path / "parquet"
    folder.mkdir()
    first = write_hub_parquet(str(folder / "train-0.parquet"), {"a": 12, "b": 14}, dark_on_white=False)
    second = write_hub_parquet(str(folder / "train-1.parquet"), {"c": 16}, seed=1, dark_on_white=False)
    population = build_population(config(str(folder), tmp_path / "cache"))
    assert population.cache.info["inverted"] == 0
    for writer, images in (first | second).items():
        assert np.array_equal(population.user_images(writer)[0], images)


def test_string_characters_are_mapped(tmp_path):
    import datasets

    path = tmp_path / "strings.parquet"
    write_hub_parquet(str(path), {"a": 12, "b": 12}, character_feature=datasets.Value("string"), labels="z")
    population = build_population(config(str(path), tmp_path / "cache"))
    assert set(population.user_images("a")[1].tolist()) == {61}


def test_cache_reused(parquet, tmp_path, monkeypatch):
    path, _ = parquet
    first = build_population(config(str(path), tmp_path / "cache"))
    monkeypatch.setattr(hub, "convert_dataset", lambda *a: pytest.fail("converted twice"))
    second = build_population(config(str(path), tmp_path / "cache"))
    assert second.cache.path == first.cache.path


def test_converter_cli(parquet, tmp_path, capsys):
    path, _ = parquet
    assert run_cli(["--parquet", str(path), "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "writers: 4" in out and "inverted: 108" in out
    population = build_population(config(str(path), tmp_path / "c"))
    assert population.cache.path.startswith(str(tmp_path / "c"))


def assert_nothing_cached(cache):
    leftovers = [n for n in os.listdir(cache) if not n.endswith(".lock")] if cache.exists() else []
    assert leftovers == []


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nowhere.parquet does not exist"):
        build_population(config(str(tmp_path / "nowhere.parquet"), tmp_path / "cache"))


def test_folder_without_parquet(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \*\.parquet files in .*empty"):
        build_population(config(str(tmp_path / "empty"), tmp_path / "cache"))


def test_truncated_parquet_names_the_file(parquet, tmp_path):
    path, _ = parquet
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"corrupt parquet .*femnist\.parquet"):
        build_population(config(str(path), tmp_path / "cache"))
    assert_nothing_cached(tmp_path / "cache")


def test_wrong_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"image": [b"x"], "label": [1]}), path)
    with pytest.raises(DataError, match=r"other\.parquet lacks column\(s\) \['writer_id', 'character'\]"):
        build_population(config(str(path), tmp_path / "cache"))


def test_label_outside_0_61(tmp_path):
    import datasets

    path = tmp_path / "labels.parquet"
    write_hub_parquet(str(path), {"a": 12, "b": 12}, character_feature=datasets.Value("int64"), labels=70)
    with pytest.raises(DataError, match="writer a has label 70; FEMNIST labels are 0..61"):
        build_population(config(str(path), tmp_path / "cache"))
    assert_nothing_cached(tmp_path / "cache")


def test_unreadable_image(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad_png.parquet"
    image = pa.array([{"bytes": b"not a png", "path": None}] * 12)
    table = pa.table({"image": image, "writer_id": ["a"] * 12, "hsf_id": [0] * 12, "character": [1] * 12})
    pq.write_table(table, path)
    with pytest.raises(DataError, match="writer a: image 0 is not a readable image"):
        build_population(config(str(path), tmp_path / "cache"))
