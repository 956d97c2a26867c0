"""A user's data arriving over days, with optional drift: what the lifelong policies live through.

A stream is a pure function of (seed, user, settings, population): every policy, process and
Flower node that builds the stream of a user gets the same inputs in the same order.

How a user with a few hundred images yields many days of inputs, honestly:
- The user's images are split once (seeded) into *measurement* images (`eval_fraction`) and
  *trainable* images. Arrivals cycle through seeded permutations of the whole pool (without
  replacement within a cycle), so any number of days can be served.
- `trainable`: a trainable image on its first arrival; only these may enter the on-device buffer.
  A repeat is served but not buffered (the device has seen it), so no image is ever both trained
  on and measured, or in a personalisation's training and validation splits at once.
- `measured`: the arrivals that count for the day's accuracy: measurement images (whenever they
  arrive; nothing trains on them) and trainable images on their first arrival. None of them can
  have been trained on before, whatever the policy; the set is a property of the stream,
  identical for every policy. Once a user's trainable images have all arrived, no new samples
  arrive until a drift brings new ones (the Orchestrator then has nothing to personalise on).
- Repeats are exact copies: random affine variants were tried and shifted the distribution
  (-4 pp for the global model's final exit on the synthetic default), an artificial drift.
Drift (`DriftConfig`): a seeded share of users (each user drifts when a hash of (seed, user)
falls below `share`, so the drifted set does not depend on who else takes part) drifts at a seeded
day in [first_day, last_day]. `labels`: the user's class popularity is reversed among the classes
it has at least two images of (its rare classes become its popular ones); `writer`: the stream
switches to another held-out user's images (the phone changes hands); `both`: the other writer,
with that writer's popularity reversed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedexits.data.base import Population, UserDataError
from fedexits.data.split import rng_for, stable_seed
from fedexits.errors import SettingsError

DRIFT_SCENARIOS = ("none", "labels", "writer", "both")
MIN_CLASS_IMAGES = 2  # a class needs this many images to become popular under label drift


@dataclass
class StreamConfig:
    """days: days the run lasts; inputs_per_day: inputs arriving each day (every user);
    label_fraction: share of each day's inputs that carry a label (the rest are unlabelled, trained
    with the final exit's pseudo-labels); eval_fraction: share of a user's images kept for
    measurement only (never buffered, never trained on)."""

    days: int = 14
    inputs_per_day: int = 20
    label_fraction: float = 1.0
    eval_fraction: float = 0.5

    def __post_init__(self):
        _check("lifecycle.stream.days", self.days, self.days >= 1, "an integer >= 1")
        _check(
            "lifecycle.stream.inputs_per_day",
            self.inputs_per_day,
            self.inputs_per_day >= 1,
            "an integer >= 1",
        )
        _check(
            "lifecycle.stream.label_fraction", self.label_fraction, 0 <= self.label_fraction <= 1, "in [0, 1]"
        )
        _check("lifecycle.stream.eval_fraction", self.eval_fraction, 0 <= self.eval_fraction < 1, "in [0, 1)")


@dataclass
class DriftConfig:
    """scenario: none | labels | writer | both; share: probability that a user drifts (a seeded
    hash of the user); first_day..last_day: the day a drifted user's stream changes (seeded per
    user, inclusive; day 0 is the first day, so first_day >= 1 leaves a day before the drift)."""

    scenario: str = "writer"
    share: float = 0.5
    first_day: int = 5
    last_day: int = 8

    def __post_init__(self):
        ok = self.scenario in DRIFT_SCENARIOS
        _check("lifecycle.drift.scenario", self.scenario, ok, f"one of {', '.join(DRIFT_SCENARIOS)}")
        _check("lifecycle.drift.share", self.share, 0 <= self.share <= 1, "in [0, 1]")
        _check("lifecycle.drift.first_day", self.first_day, self.first_day >= 1, "an integer >= 1")
        _check(
            "lifecycle.drift.last_day", self.last_day, self.last_day >= self.first_day, ">= drift.first_day"
        )


def _check(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise SettingsError(f"{name} must be {expected}, got {value!r}")


def check_drift_within(stream: StreamConfig, drift: DriftConfig) -> None:
    """A drift day must fall inside the run (days 1..days-1)."""
    if drift.scenario != "none" and drift.last_day > stream.days - 1:
        raise SettingsError(
            f"lifecycle.drift.last_day must be <= lifecycle.stream.days - 1 = {stream.days - 1} "
            f"(inside the run), "
            f"got {drift.last_day}"
        )


def drift_day(seed: int, user: str, drift: DriftConfig) -> int | None:
    """The day `user`'s stream drifts, or None if it does not."""
    if drift.scenario == "none" or drift.share == 0:
        return None
    if stable_seed(seed, "drift-user", user) / 2**63 >= drift.share:
        return None
    return int(rng_for(seed, "drift-day", user).integers(drift.first_day, drift.last_day + 1))


@dataclass
class DayInputs:
    """One user's inputs of one day. `images` are what a device stores (uint8), `x` what the
    model sees. Labels are the truth (for measuring); only `labelled` ones are known on device."""

    user: str
    day: int
    images: np.ndarray  # uint8 (n, C, H, W)
    x: torch.Tensor  # float32 (n, C, H, W)
    labels: torch.Tensor  # int64 (n,)
    labelled: torch.Tensor  # bool (n,): the device knows this label
    measured: torch.Tensor  # bool (n,): counts for the day's accuracy (never trained on before)
    trainable: torch.Tensor  # bool (n,): may enter the on-device buffer (first arrivals only)
    drift_active: bool

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class _Pool:
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    is_eval: np.ndarray  # bool (N,)


class UserStream:
    """The arrivals of one user over `config.days` days; `day(d)` materialises day d."""

    def __init__(
        self,
        population: Population,
        user: str,
        config: StreamConfig,
        drift: DriftConfig,
        seed: int,
    ):
        check_drift_within(config, drift)
        self.population, self.user, self.config, self.seed = population, user, config, seed
        self.drift_day = drift_day(seed, user, drift)
        self.scenario = drift.scenario if self.drift_day is not None else "none"
        self.donor = None
        pools = [self._pool(user)]
        if self.scenario in ("writer", "both"):
            self.donor = choose_donor(population, user, seed)
            pools.append(self._pool(self.donor))
        self.pools = pools
        self._plan()

    def _pool(self, user: str) -> _Pool:
        images, labels = self.population.stream_pool(user)
        n = len(labels)
        if n < 2:
            raise UserDataError(f"user {user} has {n} image(s); a stream needs at least 2")
        n_eval = 0
        if self.config.eval_fraction > 0:
            n_eval = min(n - 1, max(1, round(self.config.eval_fraction * n)))
        is_eval = np.zeros(n, bool)
        is_eval[rng_for(self.seed, "stream-eval", user).permutation(n)[:n_eval]] = True
        return _Pool(images, labels, is_eval)

    def _plan(self) -> None:
        """Which image arrives at each position, and how often it arrived before."""
        per_day, days = self.config.inputs_per_day, self.config.days
        n_before = per_day * (days if self.drift_day is None else self.drift_day)
        n_after = per_day * days - n_before
        pool_id = np.zeros(per_day * days, np.int64)
        index = [cycled(rng_for(self.seed, "stream-order", self.user), len(self.pools[0].labels), n_before)]
        if n_after:
            source = len(self.pools) - 1
            pool_id[n_before:] = source
            rng = rng_for(self.seed, "stream-drift", self.user)
            if self.scenario in ("labels", "both"):
                index.append(reversed_popularity(rng, self.pools[source].labels, n_after))
            else:
                index.append(cycled(rng, len(self.pools[source].labels), n_after))
        index = np.concatenate(index)
        key = pool_id * (1 << 32) + index
        seen: dict[int, int] = {}
        appearance = np.empty(len(key), np.int64)
        for i, k in enumerate(key.tolist()):
            appearance[i] = seen.get(k, 0)
            seen[k] = appearance[i] + 1
        self.pool_id, self.index, self.appearance = pool_id, index, appearance

    def day(self, d: int) -> DayInputs:
        if not 0 <= d < self.config.days:
            raise ValueError(f"day must be in 0..{self.config.days - 1}, got {d}")
        per_day = self.config.inputs_per_day
        at = slice(d * per_day, (d + 1) * per_day)
        pool_id, index, appearance = self.pool_id[at], self.index[at], self.appearance[at]
        images = np.empty((per_day, *self.pools[0].images.shape[1:]), np.uint8)
        labels, is_eval = np.empty(per_day, np.int64), np.empty(per_day, bool)
        for p, pool in enumerate(self.pools):
            rows = pool_id == p
            images[rows] = pool.images[index[rows]]
            labels[rows], is_eval[rows] = pool.labels[index[rows]], pool.is_eval[index[rows]]
        first = appearance == 0
        n_labelled = math.floor(self.config.label_fraction * per_day + 0.5)
        labelled = np.zeros(per_day, bool)
        labelled[rng_for(self.seed, "stream-labelled", self.user, d).permutation(per_day)[:n_labelled]] = True
        return DayInputs(
            user=self.user,
            day=d,
            images=images,
            x=self.population.model_input(images),
            labels=torch.from_numpy(labels),
            labelled=torch.from_numpy(labelled),
            measured=torch.from_numpy(is_eval | first),
            trainable=torch.from_numpy(~is_eval & first),
            drift_active=self.drift_day is not None and d >= self.drift_day,
        )


def user_stream(population: Population, user: str, config: StreamConfig, drift: DriftConfig, seed: int):
    """The stream of `user` (raises UserDataError if the user cannot stream)."""
    return UserStream(population, user, config, drift, seed)


def choose_donor(population: Population, user: str, seed: int) -> str:
    """The writer who takes over `user`'s phone: another held-out user, seeded."""
    others = sorted(u for u in population.held_out_users if u != user)
    if not others:
        raise UserDataError(f"user {user}: writer drift needs another held-out user, the population has none")
    return others[int(rng_for(seed, "drift-donor", user).integers(len(others)))]


def cycled(rng: np.random.Generator, n: int, length: int) -> np.ndarray:
    """`length` indices: consecutive seeded permutations of 0..n-1."""
    cycles = -(-length // n) if length else 0
    return np.concatenate([rng.permutation(n) for _ in range(cycles)] or [np.empty(0, np.int64)])[:length]


def reversed_popularity(rng: np.random.Generator, labels: np.ndarray, length: int) -> np.ndarray:
    """`length` image indices whose classes follow the pool's class counts reversed in rank among
    classes with >= MIN_CLASS_IMAGES images: the rarest such class becomes the most popular.
    Within a class, images cycle through seeded permutations."""
    classes, counts = np.unique(labels, return_counts=True)
    keep = counts >= MIN_CLASS_IMAGES
    if not keep.any():
        keep[:] = True
    classes, counts = classes[keep], counts[keep]
    order = np.argsort(-counts, kind="stable")  # most popular first
    weights = np.empty(len(classes))
    weights[order] = counts[order[::-1]]
    drawn = rng.choice(len(classes), size=length, p=weights / weights.sum())
    index = np.empty(length, np.int64)
    for c, cls in enumerate(classes):
        slots = np.flatnonzero(drawn == c)
        members = np.flatnonzero(labels == cls)
        index[slots] = members[cycled(rng, len(members), len(slots))]
    return index
