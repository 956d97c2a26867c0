"""The compact on-disk cache shared by every FEMNIST-like source.

One folder per (source, settings): images.npy (N, 28, 28) uint8 ink bright, labels.npy (N,)
int16, and index.json (user -> [row offset, count], the settings that made the cache, file sizes,
and the source files' sizes and SHA-256 digests: a changed source means a rebuilt cache).
A user's images are contiguous, so loading one is a slice of a memory map, and opening the cache
is one small JSON read plus two memory maps: cheap enough for every Flower client process.

A cache is built in a hidden temporary folder and renamed into place in one os.replace, under a
file lock, so readers never see a half-written cache and concurrent processes build it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

log = logging.getLogger(__name__)
T = TypeVar("T")

FORMAT_VERSION = 1
IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
INDEX_FILE = "index.json"
_RAW_FILE = "images.raw"


class CacheInvalid(Exception):
    """The cache folder is missing, stale or damaged; the message says which and why."""


def _sha256(file: str) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_index(folder: str) -> dict:
    """A cache folder's index.json, or {} if there is none that can be read."""
    try:
        with open(os.path.join(folder, INDEX_FILE)) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def source_fingerprint(files: list[str], base: str | None, recorded: dict) -> tuple[list, dict]:
    """([name, size, SHA-256] of every source file, {name: mtime_ns}). The digests decide
    whether a cache is stale, so a copied or touched source (new times, same bytes) is not
    rebuilt. A file whose size and modification time match `recorded` (the cache's index) keeps
    the digest recorded there unread: an unchanged source costs one stat per file."""
    recorded_mtimes = recorded.get("source_mtimes") or {}
    known = {e[0]: e for e in recorded.get("fingerprint") or [] if isinstance(e, list) and len(e) == 3}
    fingerprint, mtimes = [], {}
    for file in files:
        name = os.path.relpath(file, base) if base else file
        stat = os.stat(file)
        mtimes[name] = stat.st_mtime_ns
        entry = known.get(name)
        unchanged = (
            entry is not None and entry[1] == stat.st_size and recorded_mtimes.get(name) == stat.st_mtime_ns
        )
        fingerprint.append([name, stat.st_size, entry[2] if unchanged else _sha256(file)])
    return fingerprint, mtimes


def cache_name(kind: str, settings: dict) -> str:
    """Folder name: the source kind plus a hash of everything that determines the content."""
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"{kind}-{digest}"


@dataclass
class ImageCache:
    path: str
    images: np.ndarray  # (N, H, W) uint8 memmap, ink bright
    labels: np.ndarray  # (N,) int16 memmap
    users: dict[str, tuple[int, int]]  # user -> (row offset, count)
    settings: dict
    info: dict = field(default_factory=dict)  # statistics recorded when the cache was built

    @classmethod
    def open(cls, path: str, settings: dict | None = None, fingerprint=None) -> ImageCache:
        index_path = os.path.join(path, INDEX_FILE)
        if not os.path.exists(index_path):
            raise CacheInvalid(f"{path} has no {INDEX_FILE}")
        try:
            with open(index_path) as f:
                index = json.load(f)
        except (OSError, ValueError) as error:
            raise CacheInvalid(f"unreadable {index_path}: {error}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT_VERSION:
            raise CacheInvalid(f"{index_path} is not a format-{FORMAT_VERSION} cache index")
        if settings is not None and index.get("settings") != settings:
            raise CacheInvalid(f"{index_path} was built with other settings")
        if fingerprint is not None and index.get("fingerprint") != fingerprint:
            raise CacheInvalid(f"{index_path} is stale: its source files changed")
        try:
            for name, size in index["file_sizes"].items():
                actual = os.path.getsize(os.path.join(path, name))
                if actual != size:
                    raise CacheInvalid(f"{os.path.join(path, name)} has {actual} bytes, not {size}")
            images = np.load(os.path.join(path, IMAGES_FILE), mmap_mode="r")
            labels = np.load(os.path.join(path, LABELS_FILE), mmap_mode="r")
            users = {user: (int(start), int(count)) for user, (start, count) in index["users"].items()}
        except CacheInvalid:
            raise
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CacheInvalid(f"damaged cache {path}: {error}") from None
        total = index.get("num_images")
        if images.dtype != np.uint8 or images.ndim != 3 or len(images) != total or len(labels) != total:
            raise CacheInvalid(f"damaged cache {path}: array shapes do not match {INDEX_FILE}")
        if sum(count for _, count in users.values()) != total:
            raise CacheInvalid(f"damaged cache {path}: user counts do not add up to {total}")
        return cls(path, images, labels, users, index["settings"], index.get("info", {}))

    def user_slice(self, user: str) -> slice:
        start, count = self.users[user]
        return slice(start, start + count)


class CacheWriter:
    """Collects users' images chunk by chunk, in any order, then writes the grouped cache files.

    Chunks go to a raw file first so that sources larger than memory (full FEMNIST is ~640 MB of
    pixels) and sources that deliver a user in several pieces (LEAF train + test) both work.
    """

    def __init__(self, directory: str, image_shape: tuple[int, int] = (28, 28)):
        self.directory = directory
        self.image_shape = tuple(image_shape)
        # stays open across add() calls; finish() or abort() closes it
        self._raw = open(os.path.join(directory, _RAW_FILE), "wb")  # noqa: SIM115
        self._chunks: dict[str, list[tuple[int, int]]] = {}
        self._labels: list[np.ndarray] = []
        self._rows = 0

    def add(self, user: str, images: np.ndarray, labels: np.ndarray) -> None:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.shape[1:] != self.image_shape or len(images) != len(labels):
            raise ValueError(f"user {user}: got images {images.shape} and {len(labels)} labels")
        self._raw.write(images.tobytes())
        self._labels.append(np.asarray(labels, dtype=np.int16))
        self._chunks.setdefault(user, []).append((self._rows, len(images)))
        self._rows += len(images)

    def finish(
        self, settings: dict, fingerprint=None, info: dict | None = None, source_mtimes: dict | None = None
    ) -> None:
        self._raw.close()
        raw_path = os.path.join(self.directory, _RAW_FILE)
        shape = (self._rows, *self.image_shape)
        raw = np.memmap(raw_path, np.uint8, "r", shape=shape) if self._rows else np.zeros(shape, np.uint8)
        raw_labels = np.concatenate(self._labels) if self._labels else np.zeros(0, np.int16)
        images = np.lib.format.open_memmap(os.path.join(self.directory, IMAGES_FILE), "w+", np.uint8, shape)
        labels = np.empty(self._rows, np.int16)
        users, row = {}, 0
        for user, chunks in self._chunks.items():
            users[user] = [row, sum(count for _, count in chunks)]
            for start, count in chunks:
                images[row : row + count] = raw[start : start + count]
                labels[row : row + count] = raw_labels[start : start + count]
                row += count
        images.flush()
        del images, raw
        os.remove(raw_path)
        np.save(os.path.join(self.directory, LABELS_FILE), labels)
        index = {
            "format": FORMAT_VERSION,
            "settings": settings,
            "fingerprint": fingerprint,
            "source_mtimes": source_mtimes or {},
            "num_images": self._rows,
            "image_shape": list(self.image_shape),
            "file_sizes": {
                name: os.path.getsize(os.path.join(self.directory, name))
                for name in (IMAGES_FILE, LABELS_FILE)
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "info": info or {},
            "users": users,
        }
        with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
            json.dump(index, f)

    def abort(self) -> None:
        if not self._raw.closed:
            self._raw.close()


@contextlib.contextmanager
def _locked(lock_path: str) -> Iterator[None]:
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_tree(path: str) -> None:
    """Move aside first (one rename), then delete, so nobody sees a half-deleted cache."""
    trash = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.trash-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def build_once(
    cache_root: str, name: str, open_existing: Callable[[str], T], build_into: Callable[[str], None]
) -> T:
    """Return open_existing(cache_root/name), building the folder first if it fails.

    build_into(temporary) fills a hidden temporary folder that is then renamed into place, under
    a file lock so that concurrent processes build once and wait for each other. A failed or
    interrupted build leaves nothing behind; a damaged folder is replaced.
    """
    final = os.path.join(cache_root, name)
    try:
        return open_existing(final)
    except CacheInvalid as reason:
        if os.path.exists(final):
            log.warning("rebuilding cache: %s", reason)
    os.makedirs(cache_root, exist_ok=True)
    with _locked(os.path.join(cache_root, f".{name}.lock")):
        try:  # another process may have built it while we waited for the lock
            return open_existing(final)
        except CacheInvalid:
            pass
        if os.path.exists(final):
            _remove_tree(final)
        prefix = f".{name}.tmp-"
        for leftover in os.listdir(cache_root):  # from a process killed mid-build
            if leftover.startswith(prefix):
                shutil.rmtree(os.path.join(cache_root, leftover), ignore_errors=True)
        temporary = tempfile.mkdtemp(prefix=prefix, dir=cache_root)
        try:
            build_into(temporary)
            os.chmod(temporary, 0o755)  # mkdtemp makes it private; the cache is shared
            os.replace(temporary, final)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    return open_existing(final)


def open_or_build(
    cache_root: str,
    kind: str,
    settings: dict,
    build: Callable[[CacheWriter], dict | None],
    sources: list[str] | None = None,
    base: str | None = None,
) -> ImageCache:
    """Open the image cache for `settings`, building it with `build(writer)` if missing or invalid.

    `build` adds every user to the writer and returns statistics to record in the index.
    `sources`: the files it reads (named relative to `base` if given); a change of their content
    rebuilds the cache (`source_fingerprint`).
    """
    settings = json.loads(json.dumps(settings))  # compare as stored: tuples become lists
    fingerprint, mtimes = None, {}
    if sources is not None:
        recorded = _read_index(os.path.join(cache_root, cache_name(kind, settings)))
        fingerprint, mtimes = source_fingerprint(sources, base, recorded)

    def build_into(directory: str) -> None:
        writer = CacheWriter(directory)
        try:
            started = time.perf_counter()
            info = dict(build(writer) or {})
            info["build_seconds"] = round(time.perf_counter() - started, 2)
            writer.finish(settings, fingerprint, info, mtimes)
        finally:
            writer.abort()
        log.info("built %s cache in %.1f s", kind, info["build_seconds"])

    return build_once(
        cache_root,
        cache_name(kind, settings),
        lambda path: ImageCache.open(path, settings, fingerprint),
        build_into,
    )


def summary_line(cache: ImageCache) -> str:
    """One line about a cache's writers and images (for the data_prep scripts)."""
    counts = np.array([count for _, count in cache.users.values()])
    return (
        f"writers: {len(counts)}, images: {counts.sum()}, per writer: mean {counts.mean():.1f}, "
        f"sd {counts.std():.1f}, min {counts.min()}, max {counts.max()}"
    )
