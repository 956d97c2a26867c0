import pytest

from fedexits.data import DataError
from fedexits.data.config import parse_config
from fedexits.data.split import (
    choose_held_out,
    labelled_mask,
    read_held_out_file,
    split_user,
    tuning_reporting_split,
    write_user_list,
)
from fedexits.errors import SettingsError, UserDataError


def config(**overrides):
    return parse_config({"source": "synthetic", **overrides})


def test_split_sizes_and_fraction_note_for_small_users():
    cfg = config(n_test=100)
    train, test, notes = split_user("big", 250, cfg)
    assert (len(train), len(test), notes) == (150, 100, [])
    assert set(train).isdisjoint(test) and len(set(train) | set(test)) == 250
    train, test, notes = split_user("small", 120, cfg)
    assert (len(train), len(test)) == (60, 60)
    assert notes and "120 images" in notes[0] and "50%" in notes[0]


def test_user_with_too_few_images_names_user_and_counts():
    with pytest.raises(UserDataError, match=r"user tiny has 3 images; need at least 10"):
        split_user("tiny", 3, config(min_images=10))


def test_held_out_by_count_is_seeded_and_excludes_small_users():
    counts = {f"u{i}": 50 for i in range(20)} | {"small": 5}
    global_a, held_a, dropped = choose_held_out(counts, config(num_held_out=5, seed=1))
    _, held_b, _ = choose_held_out(counts, config(num_held_out=5, seed=1))
    _, held_c, _ = choose_held_out(counts, config(num_held_out=5, seed=2))
    assert held_a == held_b and held_a != held_c
    assert len(held_a) == 5 and set(held_a).isdisjoint(global_a)
    assert dropped == ["small"] and "small" not in global_a + held_a


def test_held_out_file(tmp_path):
    counts = {f"u{i}": 50 for i in range(5)} | {"small": 3}
    listing = tmp_path / "held_out.txt"
    listing.write_text("# held out\nu3\n\nu1\n")
    global_users, held_out, _ = choose_held_out(counts, config(held_out_file=str(listing)))
    assert held_out == ["u3", "u1"] and "u3" not in global_users
    # unknown or too small users are held out anyway: each fails alone when loaded
    listing.write_text("u1\nghost\nsmall\n")
    global_users, held_out, _ = choose_held_out(counts, config(held_out_file=str(listing)))
    assert held_out == ["u1", "ghost", "small"] and "u1" not in global_users
    # a file of which no user is usable is refused at once
    listing.write_text("ghost\nsmall\n")
    with pytest.raises(DataError, match="none of its 2 users is in the data"):
        choose_held_out(counts, config(held_out_file=str(listing)))
    with pytest.raises(DataError, match="missing.txt"):
        choose_held_out(counts, config(held_out_file=str(tmp_path / "missing.txt")))


def test_too_many_held_out_users():
    with pytest.raises(DataError, match="num_held_out=5"):
        choose_held_out({f"u{i}": 50 for i in range(5)}, config(num_held_out=5))


def test_label_fraction_rounds_and_nests():
    assert int(labelled_mask("u", 30, 0.0, 0).sum()) == 0
    assert int(labelled_mask("u", 30, 1.0, 0).sum()) == 30
    quarter, half = labelled_mask("u", 30, 0.25, 7), labelled_mask("u", 30, 0.5, 7)
    assert int(quarter.sum()) == 8 and int(half.sum()) == 15
    assert bool((half | ~quarter).all())  # every sample labelled at 25% is labelled at 50%
    assert not bool((labelled_mask("u", 30, 0.5, 8) == half).all())
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(SettingsError, match="label_fraction"):
            labelled_mask("u", 30, bad, 0)


def test_tuning_reporting_split_is_seeded_disjoint_and_order_free():
    users = [f"w{i:02d}" for i in range(25)]
    tuning, reporting = tuning_reporting_split(users, seed=0)
    assert (len(tuning), len(reporting)) == (12, 13)
    assert set(tuning).isdisjoint(reporting) and sorted(tuning + reporting) == users
    assert tuning_reporting_split(users[::-1] + users[:3], seed=0) == (tuning, reporting)
    assert tuning_reporting_split(users, seed=1) != (tuning, reporting)
    with pytest.raises(DataError, match="at least 2 users"):
        tuning_reporting_split(["only"], seed=0)


def test_recorded_halves_of_the_shared_leaf_writers(tmp_path):
    """simulations/leaf_tuning.txt and leaf_reporting.txt are the seed-0 split of the held-out
    list; settings are chosen on the first and reported on the second."""
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "simulations"
    held_out = read_held_out_file(str(folder / "leaf_held_out.txt"))
    tuning = read_held_out_file(str(folder / "leaf_tuning.txt"))
    reporting = read_held_out_file(str(folder / "leaf_reporting.txt"))
    assert (tuning, reporting) == tuning_reporting_split(held_out, seed=0)
    write_user_list(tmp_path / "users.txt", tuning, "a header\nover two lines")
    assert read_held_out_file(str(tmp_path / "users.txt")) == tuning
    assert (tmp_path / "users.txt").read_text().startswith("# a header\n# over two lines\n")
