"""Frozen-backbone features for exit training, computed once and reused across epochs.

The backbone and the final classifier are frozen during personalisation, so the features at the
attach points and the final exit's logits do not change between epochs: computing them once turns
personalisation from `epochs` backbone passes into one. Exits whose features would not fit the
memory budget are recomputed per batch; with data augmentation nothing is cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from .device import module_device


def _pool(features: torch.Tensor, grid: int = 1) -> torch.Tensor:
    """(N, C) features averaged over space, or (N, C * grid * grid) averaged over each cell of a
    grid x grid partition of the feature map."""
    if features.dim() <= 2:
        return features
    if grid == 1:
        return features.flatten(2).mean(2)
    return torch.nn.functional.adaptive_avg_pool2d(features, grid).flatten(1)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class FrozenFeatures:
    """Serves (features at every attach point, final logits) for batches of a fixed sample set."""

    def __init__(
        self,
        model,
        x: torch.Tensor,
        cache: bool = True,
        budget_mb: float = 512.0,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        chunk_size: int = 256,
    ):
        self.model = model
        self.x = x.to(module_device(model))  # features live where the model computes
        self.augment = augment
        self.chunk_size = chunk_size
        self.cached_exits: list[int] = []
        self.cached_features: dict[int, torch.Tensor] = {}
        self.final_logits: torch.Tensor | None = None
        if augment is None and cache:
            self._fill_cache(budget_mb)

    @property
    def nbytes(self) -> int:
        """Memory held: the images and whatever was cached from them."""
        tensors = [self.x, *self.cached_features.values()]
        if self.final_logits is not None:
            tensors.append(self.final_logits)
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def uncached_exits(self) -> list[int]:
        return [k for k in range(self.model.num_exits) if k not in self.cached_features]

    @torch.no_grad()
    def _fill_cache(self, budget_mb: float) -> None:
        """One pass over the samples; keep the final logits and, within the budget, the features
        of the exits that are most expensive to recompute per byte of cache."""
        model, n = self.model, len(self.x)
        shapes = [f.shape[1:] for f in model.backbone_features(self.x[:1])[0]]
        nbytes = [n * s.numel() * self.x.element_size() for s in shapes]
        # Recompute cost of an exit grows with its depth: prefer deep exits, then small ones.
        order = sorted(range(model.num_exits), key=lambda k: (-model.exit_after[k], nbytes[k]))
        budget, keep = budget_mb * 2**20, []
        for k in order:
            if nbytes[k] <= budget:
                keep.append(k)
                budget -= nbytes[k]
        self.cached_exits = sorted(keep)
        parts = {k: [] for k in keep}
        finals = []
        for sl in _chunks(n, self.chunk_size):
            features, final_logits = model.backbone_features(self.x[sl])
            for k in keep:
                parts[k].append(features[k])
            finals.append(final_logits)
        self.cached_features = {k: torch.cat(v) for k, v in parts.items()}
        self.final_logits = torch.cat(finals)

    @torch.no_grad()
    def epoch(self, order: torch.Tensor, bounds: list[tuple[int, int]]):
        """Yield (sample indices, features, final logits) for consecutive slices of `order`.
        Cached tensors are gathered once per epoch in `order`, so each step takes views."""
        if self.final_logits is None or self.uncached_exits:
            for start, end in bounds:
                yield (order[start:end], *self.batch(order[start:end]))
            return
        shuffled = [self.cached_features[k][order] for k in range(self.model.num_exits)]
        final_logits = self.final_logits[order]
        for start, end in bounds:
            yield order[start:end], [f[start:end] for f in shuffled], final_logits[start:end]

    @torch.no_grad()
    def batch(self, index: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Features of every exit and final logits for the samples in `index`."""
        if self.final_logits is None:  # augmentation or caching off: the paper's way
            x = self.x[index]
            return self.model.backbone_features(x if self.augment is None else self.augment(x))
        missing = self.uncached_exits
        recomputed: list[torch.Tensor] = []
        if missing:
            recomputed, _ = self.model.backbone_features(self.x[index], upto=max(missing) + 1)
        features = [
            self.cached_features[k][index] if k in self.cached_features else recomputed[k]
            for k in range(self.model.num_exits)
        ]
        return features, self.final_logits[index]

    @torch.no_grad()
    def pooled(self, exit_index: int = 0, grid: int = 1) -> torch.Tensor:
        """(N, C * grid * grid) the features at exit `exit_index`'s attach point, averaged over
        space (or over the cells of a grid): a summary of what the frozen network sees (the
        orchestrator's feature-shift rule)."""
        if exit_index in self.cached_features:
            return _pool(self.cached_features[exit_index], grid).cpu()
        parts = [
            _pool(self.model.backbone_features(self.x[sl], upto=exit_index + 1)[0][exit_index], grid)
            for sl in _chunks(len(self.x), self.chunk_size)
        ]
        return torch.cat(parts).cpu() if parts else torch.zeros(0, 0)

    @torch.no_grad()
    def exit_probabilities(self, model=None) -> torch.Tensor:
        """Softmax of every exit over all samples, (M+1, N, classes), with the exits as they are
        now: re-evaluating after personalisation costs only the heads. `model`: whose exits to
        run (default: the model that computed the features; another copy with the same backbone
        works, e.g. another worker's)."""
        model = model or self.model
        model.exits.eval()
        features, final_logits = self.batch(torch.arange(len(self.x)))
        return torch.stack(model.heads_forward(features) + [final_logits]).softmax(dim=-1).cpu()


class FeatureStore:
    """Frozen-backbone features with their labels, one entry per sample set (a federated client),
    kept across calls: the backbone never changes during a run, so a client's features are
    computed once per process instead of once per round. The least recently used entries are
    dropped beyond `budget_mb`; an entry larger than the budget is not kept."""

    def __init__(self, budget_mb: float):
        self.budget_bytes = budget_mb * 2**20
        self._items: OrderedDict[str, tuple[FrozenFeatures, torch.Tensor]] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(
        self, key: str, make: Callable[[], tuple[FrozenFeatures, torch.Tensor]]
    ) -> tuple[FrozenFeatures, torch.Tensor]:
        """(features, labels) stored under `key`, or `make()`'s (stored if they fit)."""
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        entry = make()
        size = _entry_bytes(entry)
        if size <= self.budget_bytes:
            while self._items and self.nbytes + size > self.budget_bytes:
                _, dropped = self._items.popitem(last=False)
                self.nbytes -= _entry_bytes(dropped)
            self._items[key] = entry
            self.nbytes += size
        return entry


def _entry_bytes(entry: tuple[FrozenFeatures, torch.Tensor]) -> int:
    features, labels = entry
    return features.nbytes + labels.numel() * labels.element_size()
