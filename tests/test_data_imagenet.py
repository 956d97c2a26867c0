import os

import numpy as np
import pytest
import torch

from fedexits.data import DataError, build_population
from fedexits.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, gaussian_popularity
from tests.data_helpers import write_image_folder

CLASSES = 16


@pytest.fixture
def imagenet(tmp_path):
    root = tmp_path / "imagenet"
    write_image_folder(str(root / "train"), CLASSES, per_class=4)
    write_image_folder(str(root / "val"), CLASSES, per_class=10, seed=1)
    return root


def config(root, cache, **overrides):
    return {
        "source": "imagenet_folder",
        "path": str(root),
        "cache_dir": str(cache),
        "image_size": 8,
        "resize_size": 8,
        "images_per_user": 30,
        "popularity_sigma": 1.5,
        "num_held_out": 6,
        "num_global_users": 4,
        "n_test": 10,
    } | overrides


def circular_distance(labels, centre):
    distance = np.abs(np.asarray(labels, dtype=float) - centre)
    return np.minimum(distance, CLASSES - distance)


def test_users_shapes_split_and_normalisation(imagenet, tmp_path):
    population = build_population(config(imagenet, tmp_path / "cache"))
    assert population.num_classes == CLASSES and population.input_shape == (3, 8, 8)
    user = population.load_user("user_000", label_fraction=0.5)
    assert (user.n_train, user.n_test, user.n_labelled) == (20, 10, 10)
    assert user.train_x.shape == (20, 3, 8, 8) and user.train_x.dtype == torch.float32
    # write_image_folder paints class k with green 128: check the ImageNet normalisation
    green = (128 / 255 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    assert torch.allclose(user.train_x[:, 1, 4, 4], torch.full((20,), green), atol=1e-4)


def test_gaussian_popularity_concentrates_labels(imagenet, tmp_path):
    population = build_population(config(imagenet, tmp_path / "cache"))
    within = []
    for user in population.held_out_users:
        data = population.load_user(user)
        labels = torch.cat([data.train_y, data.test_y]).numpy()
        centre = population.popularity_centres[user]
        within.append(np.mean(circular_distance(labels, centre) <= 2 * 1.5))
    assert np.mean(within) > 0.85  # uniform labels would put ~ 6/16 = 38% there
    popularity = gaussian_popularity(CLASSES, 15.5, 1.0)
    assert popularity[0] == popularity[15] and popularity[0] > 100 * popularity[8]  # wraps around


def test_users_come_from_val_without_duplicates_and_never_from_the_global_pool(imagenet, tmp_path):
    population = build_population(config(imagenet, tmp_path / "cache"))
    global_files = {path for path, _ in population.global_train_set().samples}
    assert len(global_files) == CLASSES * 4 and all("/train/" in f for f in global_files)
    for user in population.held_out_users:
        split, rows = population._user_rows[user]
        assert split == "val" and len(set(rows.tolist())) == 30
    assert len(population.global_users) == 4
    shards = [population._global_shard(user)[1] for user in population.global_users]
    assert sum(len(s) for s in shards) == CLASSES * 4
    assert len(set(np.concatenate(shards).tolist())) == CLASSES * 4
    x, y = population.global_train_set()[0]
    assert x.shape == (3, 8, 8) and isinstance(y, int)


def test_seed_determines_users(imagenet, tmp_path):
    a = build_population(config(imagenet, tmp_path / "cache"))
    b = build_population(config(imagenet, tmp_path / "cache"))
    c = build_population(config(imagenet, tmp_path / "cache", seed=5))
    assert a.popularity_centres == b.popularity_centres != c.popularity_centres
    assert torch.equal(a.load_user("user_001").train_x, b.load_user("user_001").train_x)


def test_file_list_is_cached(imagenet, tmp_path, monkeypatch):
    build_population(config(imagenet, tmp_path / "cache"))
    from fedexits.data import imagenet as module

    monkeypatch.setattr(module, "scan_image_folder", lambda root: pytest.fail("rescanned"))
    build_population(config(imagenet, tmp_path / "cache"))


def test_single_folder_layout_sets_users_apart(tmp_path):
    root = tmp_path / "flat"
    write_image_folder(str(root), CLASSES, per_class=10)
    population = build_population(
        config(root, tmp_path / "cache", user_pool_fraction=0.5, images_per_user=20)
    )
    user_files = set()
    for user in population.held_out_users:
        split, rows = population._user_rows[user]
        user_files |= {population.index.paths(split)[i] for i in rows}
    global_files = {os.path.relpath(p, root) for p, _ in population.global_train_set().samples}
    assert user_files and global_files and user_files.isdisjoint(global_files)
    assert len(global_files) == CLASSES * 5


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nowhere does not exist"):
        build_population(config(tmp_path / "nowhere", tmp_path / "cache"))


def test_no_class_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "image.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"no class folders in .*flat"):
        build_population(config(tmp_path / "flat", tmp_path / "cache"))
    assert [n for n in os.listdir(tmp_path / "cache") if not n.endswith(".lock")] == []


def test_empty_class_folder_is_named(imagenet, tmp_path):
    (imagenet / "val" / "class_99").mkdir()
    (imagenet / "train" / "class_99").mkdir()
    (imagenet / "train" / "class_99" / "x.png").write_bytes(
        (imagenet / "train" / "class_00" / "000.png").read_bytes()
    )
    with pytest.raises(DataError, match=r"class folder .*val/class_99 has no images"):
        build_population(config(imagenet, tmp_path / "cache"))


def test_train_and_val_classes_must_match(imagenet, tmp_path):
    os.rename(imagenet / "val" / "class_03", imagenet / "val" / "class_zz")
    with pytest.raises(DataError, match="differ"):
        build_population(config(imagenet, tmp_path / "cache"))


def test_unknown_user_and_too_many_images(imagenet, tmp_path):
    population = build_population(config(imagenet, tmp_path / "cache"))
    with pytest.raises(DataError, match="unknown user 'user_999'"):
        population.load_user("user_999")
    with pytest.raises(DataError, match="images_per_user=500 but the user pool"):
        build_population(config(imagenet, tmp_path / "cache", images_per_user=500))


def test_corrupt_image_is_named(imagenet, tmp_path):
    population = build_population(config(imagenet, tmp_path / "cache", num_held_out=1))
    split, rows = population._user_rows["user_000"]
    victim = os.path.join(population.index.roots[split], population.index.paths(split)[rows[0]])
    with open(victim, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(DataError, match=rf"unreadable image {victim}"):
        population.load_user("user_000")
