"""Who is held out, how a user splits into personalisation and test data, which samples are labelled.

Every random choice here is seeded from (config seed, purpose, user id) through a stable hash, so
any process computes the same split for a user without coordinating with the others.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch

from fedexits.data.config import CommonConfig
from fedexits.errors import DataError, SettingsError, UserDataError


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts; unlike hash(), the same in every process."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rng_for(*parts) -> np.random.Generator:
    return np.random.default_rng(stable_seed(*parts))


def too_few_images(user: str, count: int, minimum: int) -> UserDataError:
    return UserDataError(f"user {user} has {count} images; need at least {minimum}")


def read_held_out_file(path: str) -> list[str]:
    """One user id per line; blank lines and lines starting with '#' are ignored."""
    if not os.path.isfile(path):
        raise DataError(f"held_out_file {path} does not exist")
    with open(path) as f:
        ids = [line.strip() for line in f]
    ids = list(dict.fromkeys(i for i in ids if i and not i.startswith("#")))
    if not ids:
        raise DataError(f"held_out_file {path} lists no user ids")
    return ids


def choose_held_out(counts: dict[str, int], cfg: CommonConfig) -> tuple[list[str], list[str], list[str]]:
    """Split users into (global, held out, dropped for having fewer than min_images images).

    Users named in `held_out_file` are held out even when unknown or too small: each of them
    then fails alone when loaded (a list of real writers often names a few tiny ones). Only a
    file of which no user is usable stops the job."""
    eligible = sorted(user for user, count in counts.items() if count >= cfg.min_images)
    dropped = sorted(user for user, count in counts.items() if count < cfg.min_images)
    if cfg.held_out_file is not None:
        held_out = read_held_out_file(cfg.held_out_file)
        if not any(counts.get(user, 0) >= cfg.min_images for user in held_out):
            raise DataError(
                f"held_out_file {cfg.held_out_file}: none of its {len(held_out)} users is in the "
                f"data with at least min_images={cfg.min_images} images (first: {held_out[0]!r})"
            )
    else:
        if cfg.num_held_out >= len(eligible):
            raise DataError(
                f"num_held_out={cfg.num_held_out} but only {len(eligible)} users have at least "
                f"min_images={cfg.min_images} images (the global pool needs at least one)"
            )
        chosen = rng_for(cfg.seed, "held_out").choice(len(eligible), cfg.num_held_out, replace=False)
        held_out = [eligible[i] for i in sorted(chosen)]
    held_out_set = set(held_out)
    global_users = [user for user in eligible if user not in held_out_set]
    if not global_users:
        raise DataError("every eligible user is held out; the global pool would be empty")
    return global_users, held_out, dropped


def split_user(user: str, count: int, cfg: CommonConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Row positions (within the user) of its personalisation and test splits, plus notes.

    The test split has n_test images, or max_test_fraction of the user's images if that is fewer.
    """
    if count < max(cfg.min_images, 2):
        raise too_few_images(user, count, max(cfg.min_images, 2))
    n_test, notes = cfg.n_test, []
    cap = max(1, min(count - 1, math.floor(cfg.max_test_fraction * count)))
    if cap < n_test:
        n_test = cap
        notes.append(
            f"only {count} images: held out {n_test} ({n_test / count:.0%}) for test instead of {cfg.n_test}"
        )
    order = rng_for(cfg.seed, "split", user).permutation(count)
    return np.sort(order[n_test:]), np.sort(order[:n_test]), notes


def labelled_mask(user: str, n: int, label_fraction: float, seed: int) -> torch.Tensor:
    """round(label_fraction * n) samples labelled, picked by a permutation seeded with `seed`.

    Smaller fractions with the same seed label a subset of the samples larger fractions label.
    """
    if not isinstance(label_fraction, (int, float)) or not 0.0 <= label_fraction <= 1.0:
        raise SettingsError(f"personalisation.label_fraction must be in [0, 1], got {label_fraction!r}")
    n_labelled = math.floor(label_fraction * n + 0.5)
    mask = torch.zeros(n, dtype=torch.bool)
    chosen = rng_for(seed, "labelled", user).permutation(n)[:n_labelled]
    mask[torch.from_numpy(chosen)] = True
    return mask


def tuning_reporting_split(users, seed: int, tuning_fraction: float = 0.5) -> tuple[list[str], list[str]]:
    """Disjoint (tuning, reporting) halves of `users`: settings are chosen on the first and
    reported on the second, so a reported number never comes from the users it was tuned on.
    Seeded through `rng_for`, independent of the order users are listed in; each half is sorted."""
    unique = sorted(set(users))
    if len(unique) < 2:
        raise DataError(f"a tuning/reporting split needs at least 2 users, got {len(unique)}")
    if not 0 < tuning_fraction < 1:
        raise DataError(f"tuning_fraction must be in (0, 1), got {tuning_fraction}")
    n_tuning = min(len(unique) - 1, max(1, round(tuning_fraction * len(unique))))
    order = rng_for(seed, "tuning_reporting").permutation(len(unique))
    tuning = sorted(unique[i] for i in order[:n_tuning])
    reporting = sorted(unique[i] for i in order[n_tuning:])
    return tuning, reporting


def write_user_list(path, users, header: str = "") -> None:
    """One user id per line (readable by `read_held_out_file`), `header` as '#' comment lines;
    written atomically."""
    from fedexits.atomic import atomic_write

    lines = [f"# {line}".rstrip() for line in header.splitlines()] + list(users)
    atomic_write(path, lambda f: f.write("\n".join(lines) + "\n"), "w")
