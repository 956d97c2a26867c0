import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fedexits.data import build_population, synthetic
from fedexits.data.config import parse_config
from fedexits.data.glyphs import available_fonts
from fedexits.errors import SettingsError, UserDataError


def tiny(tmp_path, **overrides):
    return {
        "source": "synthetic",
        "cache_dir": str(tmp_path),
        "num_writers": 12,
        "images_per_writer_mean": 40,
        "images_per_writer_sd": 15,
        "images_per_writer_min": 20,
        "num_held_out": 3,
        "n_test": 10,
        "min_images": 10,
        "seed": 0,
    } | overrides


def all_images(population):
    return np.array(population.cache.images), np.array(population.cache.labels)  # copies


def test_population_shapes_and_pixel_convention(tmp_path):
    population = build_population(tiny(tmp_path))
    assert population.num_classes == 62 and population.input_shape == (1, 28, 28)
    assert len(population.global_users) == 9 and len(population.held_out_users) == 3
    user = population.load_user(population.held_out_users[0])
    assert user.train_x.dtype == torch.float32 and user.train_x.shape[1:] == (1, 28, 28)
    assert user.n_test == 10 and user.n_train == population.user_counts[user.user_id] - 10
    assert 0.0 <= float(user.train_x.min()) and float(user.train_x.max()) <= 1.0
    border = torch.cat([user.train_x[..., 0, :], user.train_x[..., -1, :]], -1)
    assert float(border.mean()) < 0.02  # background dark
    assert float(user.train_x.amax(dim=(1, 2, 3)).median()) > 0.5  # ink bright
    assert int(user.train_y.max()) < 62 and user.train_y.dtype == torch.int64


def test_held_out_users_never_in_global_pool(tmp_path):
    population = build_population(tiny(tmp_path))
    assert set(population.global_users).isdisjoint(population.held_out_users)
    pool_rows = set(population.global_train_set().rows.tolist())
    for user in population.held_out_users:
        rows = population.cache.user_slice(user)
        assert pool_rows.isdisjoint(range(rows.start, rows.stop))
    expected = sum(population.user_counts[u] for u in population.global_users)
    assert len(population.global_train_set()) == expected


def test_global_train_set_batches(tmp_path):
    dataset = build_population(tiny(tmp_path)).global_train_set()
    x, y = next(iter(DataLoader(dataset, batch_size=16, shuffle=True)))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (16,)
    single_x, single_y = dataset[3]
    assert single_x.shape == (1, 28, 28) and single_y == int(dataset.targets[3])


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    images_a, labels_a = all_images(build_population(tiny(tmp_path / "a")))
    images_b, labels_b = all_images(build_population(tiny(tmp_path / "b")))
    images_c, _ = all_images(build_population(tiny(tmp_path / "c", seed=1)))
    assert np.array_equal(images_a, images_b) and np.array_equal(labels_a, labels_b)
    assert images_a.shape != images_c.shape or not np.array_equal(images_a, images_c)


def test_cache_is_reused_not_regenerated(tmp_path, monkeypatch):
    population = build_population(tiny(tmp_path))
    images_file = os.path.join(population.cache.path, "images.npy")
    modified = os.stat(images_file).st_mtime_ns
    calls = []
    monkeypatch.setattr(synthetic, "generate", lambda *args: calls.append(args))
    again = build_population(tiny(tmp_path, seed=0, num_held_out=4))  # split settings differ
    assert calls == [] and again.cache.path == population.cache.path
    assert os.stat(images_file).st_mtime_ns == modified


def test_truncated_cache_is_rebuilt(tmp_path):
    population = build_population(tiny(tmp_path))
    reference, _ = all_images(population)
    images_file = os.path.join(population.cache.path, "images.npy")
    with open(images_file, "r+b") as f:
        f.truncate(os.path.getsize(images_file) // 2)
    rebuilt, _ = all_images(build_population(tiny(tmp_path)))
    assert np.array_equal(reference, rebuilt)
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".trash-" in n] == []


def test_failed_generation_leaves_no_cache_behind(tmp_path, monkeypatch):
    def broken(cfg, writer):
        writer.add("w0000", np.zeros((3, 28, 28), np.uint8), np.zeros(3))
        raise RuntimeError("interrupted")

    monkeypatch.setattr(synthetic, "generate", broken)
    with pytest.raises(RuntimeError):
        build_population(tiny(tmp_path))
    assert [n for n in os.listdir(tmp_path) if not n.endswith(".lock")] == []


def test_style_strength_zero_gives_one_style(tmp_path):
    fonts = len(available_fonts())
    same = parse_config(tiny(tmp_path, style_strength=0.0))
    styles = [synthetic.writer_style(same, w, fonts) for w in range(12)]
    assert all(style == styles[0] for style in styles)
    different = parse_config(tiny(tmp_path, style_strength=1.0))
    assert len({synthetic.writer_style(different, w, fonts)["slant"] for w in range(12)}) == 12
    # without per-sample jitter, a class looks exactly the same for every writer
    population = build_population(tiny(tmp_path, style_strength=0.0, sample_jitter=0.0))
    images, labels = all_images(population)
    for label in np.unique(labels)[:5]:
        assert (images[labels == label] == images[labels == label][0]).all()
    styled = build_population(tiny(tmp_path, style_strength=1.0, sample_jitter=0.0))
    images, labels = all_images(styled)
    label = np.bincount(labels).argmax()
    assert not (images[labels == label] == images[labels == label][0]).all()


def top_class_share(population, top=5):
    shares = []
    for user in population.global_users + population.held_out_users:
        labels = population.user_images(user)[1]
        shares.append(np.sort(np.bincount(labels, minlength=62))[::-1][:top].sum() / len(labels))
    return float(np.mean(shares))


def test_label_skew_concentrates_writers_on_few_classes(tmp_path):
    sizes = {"images_per_writer_mean": 150, "images_per_writer_sd": 10}
    plain = build_population(tiny(tmp_path, label_skew=0.0, **sizes))
    skewed = build_population(tiny(tmp_path, label_skew=20.0, **sizes))
    assert top_class_share(plain) < 0.45  # the global prior's top 5 classes hold 33%
    assert top_class_share(skewed) > 0.75


def test_global_prior_has_frequent_digits(tmp_path):
    population = build_population(tiny(tmp_path, num_writers=20))
    labels = np.asarray(population.cache.labels)
    assert 0.5 < np.mean(labels < 10) < 0.8  # FEMNIST: ~64% digits


def test_unknown_and_too_small_users(tmp_path):
    population = build_population(tiny(tmp_path, min_images=30))
    with pytest.raises(UserDataError, match="unknown user 'nobody'"):
        population.load_user("nobody")
    small = min(population.user_counts, key=population.user_counts.get)
    assert population.user_counts[small] < 30 and small in population.dropped_users
    with pytest.raises(UserDataError, match=rf"user {small} has \d+ images; need at least 30"):
        population.load_user(small)


def test_label_fraction_on_a_user(tmp_path):
    population = build_population(tiny(tmp_path))
    user = population.load_user(population.held_out_users[1], label_fraction=0.3, seed=4)
    assert user.n_labelled == int(0.3 * user.n_train + 0.5) and user.labelled.dtype == torch.bool
    with pytest.raises(SettingsError, match="label_fraction"):
        population.load_user(population.held_out_users[1], label_fraction=2)
