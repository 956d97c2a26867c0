import numpy as np
import pytest
import torch

from fedexits.data.streams import DriftConfig, StreamConfig, drift_day, user_stream
from fedexits.errors import SettingsError

from .lifecycle_helpers import SquaresPopulation

NO_DRIFT = DriftConfig(scenario="none")


def stream(population, user="u0", seed=0, drift=NO_DRIFT, **settings):
    return user_stream(population, user, StreamConfig(**settings), drift, seed)


def test_stream_is_a_pure_function_of_seed_user_and_settings():
    population = SquaresPopulation(num_users=3, images=50)
    drift = DriftConfig(scenario="both", share=1.0, first_day=2, last_day=3)
    a = stream(population, drift=drift, days=5, inputs_per_day=20)
    b = stream(SquaresPopulation(num_users=3, images=50), drift=drift, days=5, inputs_per_day=20)
    other_seed = stream(population, seed=1, drift=drift, days=5, inputs_per_day=20)
    for d in range(5):
        x, y = a.day(d), b.day(d)
        assert np.array_equal(x.images, y.images) and torch.equal(x.x, y.x)
        for name in ("labels", "labelled", "measured", "trainable"):
            assert torch.equal(getattr(x, name), getattr(y, name))
    assert any(not np.array_equal(a.day(d).images, other_seed.day(d).images) for d in range(5))


def test_recycled_inputs_are_never_both_trained_on_and_measured():
    """Honest daily accuracy: a measured input is a measurement image, or a trainable image on its
    first arrival (so no policy can have trained on it); repeats are exact and never buffered."""
    population = SquaresPopulation(num_users=2, images=40)
    s = stream(population, days=6, inputs_per_day=20, eval_fraction=0.5)  # 120 arrivals, 40 images
    pool, _ = population.stream_pool("u0")
    trainable_keys = set()
    for d in range(6):
        day = s.day(d)
        at = slice(d * 20, (d + 1) * 20)
        assert np.array_equal(day.images, pool[s.index[at]])
        keys = s.index[at].tolist()
        for key, measured, trainable in zip(keys, day.measured.tolist(), day.trainable.tolist()):
            assert key not in trainable_keys or not (measured or trainable)
            trainable_keys.update([key] if trainable else [])
        assert day.measured.any()
    assert len(trainable_keys) == 20  # half of the 40 images, each buffered once
    assert not s.day(5).trainable.any()  # every trainable image arrived in the first cycle


def test_label_fraction_labels_that_share_of_each_day():
    population = SquaresPopulation(num_users=1, images=60)
    s = stream(population, days=3, inputs_per_day=20, label_fraction=0.25)
    assert [int(s.day(d).labelled.sum()) for d in range(3)] == [5, 5, 5]


def test_writer_drift_switches_to_another_users_images():
    population = SquaresPopulation(num_users=2, images=60)
    drift = DriftConfig(scenario="writer", share=1.0, first_day=2, last_day=2)
    s = stream(population, drift=drift, days=4, inputs_per_day=10)
    assert s.drift_day == 2 and s.donor == "u1"
    donor_images, _ = population.stream_pool("u1")
    assert [s.day(d).drift_active for d in range(4)] == [False, False, True, True]
    assert np.array_equal(s.day(2).images, donor_images[s.index[20:30]])
    assert (s.pool_id[:20] == 0).all() and (s.pool_id[20:] == 1).all()


def test_label_drift_makes_rare_classes_popular():
    population = SquaresPopulation(num_users=1, images=300)
    drift = DriftConfig(scenario="labels", share=1.0, first_day=3, last_day=3)
    s = stream(population, drift=drift, days=10, inputs_per_day=30)
    before = torch.cat([s.day(d).labels for d in range(3)]).bincount(minlength=8).float()
    after = torch.cat([s.day(d).labels for d in range(3, 10)]).bincount(minlength=8).float()
    popular_before = before.argmax()
    assert after[popular_before] / after.sum() < 0.5 * before[popular_before] / before.sum()
    assert (after.argmax() != popular_before).item()


def test_drift_share_is_a_seeded_hash_of_the_user():
    drift = DriftConfig(scenario="labels", share=0.5, first_day=2, last_day=4)
    days = [drift_day(0, f"user{i}", drift) for i in range(400)]
    drifted = [d for d in days if d is not None]
    assert 0.4 < len(drifted) / len(days) < 0.6
    assert set(drifted) == {2, 3, 4}
    assert days == [drift_day(0, f"user{i}", drift) for i in range(400)]
    assert drift_day(0, "user0", DriftConfig(scenario="none")) is None


@pytest.mark.parametrize(
    "make, names",
    [
        (lambda: StreamConfig(days=0), "stream.days"),
        (lambda: StreamConfig(inputs_per_day=0), "stream.inputs_per_day"),
        (lambda: StreamConfig(label_fraction=1.5), "stream.label_fraction"),
        (lambda: DriftConfig(scenario="earthquake"), "drift.scenario"),
        (lambda: DriftConfig(first_day=0), "drift.first_day"),
        (lambda: DriftConfig(first_day=5, last_day=4), "drift.last_day"),
    ],
)
def test_bad_stream_settings_give_one_line(make, names):
    with pytest.raises(SettingsError) as error:
        make()
    assert names in str(error.value) and "\n" not in str(error.value)


def test_a_drift_day_outside_the_run_is_refused():
    population = SquaresPopulation(num_users=2, images=20)
    with pytest.raises(SettingsError, match="drift.last_day must be <= lifecycle.stream.days - 1 = 4"):
        stream(population, drift=DriftConfig(scenario="writer", first_day=3, last_day=5), days=5)


def test_image_folder_users_stream_as_uint8_and_decode_exactly(tmp_path):
    from fedexits.data import build_population
    from fedexits.data.streams import user_stream as make_stream
    from tests.data_helpers import write_image_folder

    root = tmp_path / "imagenet"
    write_image_folder(str(root / "train"), 6, per_class=3)
    write_image_folder(str(root / "val"), 6, per_class=8, seed=1)
    settings = {"image_size": 8, "resize_size": 8, "images_per_user": 20, "num_held_out": 2}
    population = build_population(
        {"source": "imagenet_folder", "path": str(root), "cache_dir": str(tmp_path / "cache"), "n_test": 5}
        | settings
        | {"num_global_users": 2}
    )
    images, labels = population.stream_pool("user_000")
    assert images.dtype == np.uint8 and images.shape == (20, 3, 8, 8) and len(labels) == 20
    user = population.load_user("user_000")
    every = torch.cat([user.train_x, user.test_x])
    decoded = population.model_input(images)
    # the same images as the one-shot protocol's, bit for bit (in another order)
    assert sorted(map(bytes, every.numpy())) == sorted(map(bytes, decoded.numpy()))
    drift = DriftConfig("labels", 1.0, 1, 2)
    s = make_stream(population, "user_000", StreamConfig(days=3, inputs_per_day=4), drift, 0)
    assert s.day(2).x.shape == (4, 3, 8, 8)
