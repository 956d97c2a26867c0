"""User populations for fedexits: one entry point, `build_population(cfg)`.

Sources (cfg["source"]): "synthetic" (offline default), "femnist_leaf", "femnist_hub",
"imagenet_folder". Every configuration key, with its default and meaning, is documented in
`fedexits.data.config` (one dataclass per source); `config_defaults(source)` lists them.

    >>> population = build_population({"source": "synthetic", "num_writers": 200})
    >>> user = population.load_user(population.held_out_users[0], label_fraction=0.5)
"""

from __future__ import annotations

from collections.abc import Mapping

from fedexits.data.base import DataError, Population, UserData
from fedexits.data.config import (
    CommonConfig,
    FemnistHubConfig,
    FemnistLeafConfig,
    ImageNetFolderConfig,
    SyntheticConfig,
    config_defaults,
    parse_config,
)
from fedexits.data.streams import DayInputs, DriftConfig, StreamConfig, UserStream, user_stream

__all__ = [
    "CommonConfig",
    "DataError",
    "DayInputs",
    "DriftConfig",
    "FemnistHubConfig",
    "FemnistLeafConfig",
    "ImageNetFolderConfig",
    "Population",
    "StreamConfig",
    "SyntheticConfig",
    "UserData",
    "UserStream",
    "build_population",
    "config_defaults",
    "parse_config",
    "user_stream",
]


def build_population(cfg: Mapping) -> Population:
    """Build the population a config describes; caches are created on first use and reused.

    Raises DataError (one line naming the file, user or key) for any bad config or input.
    """
    config = parse_config(cfg)
    if isinstance(config, ImageNetFolderConfig):
        from fedexits.data.imagenet import ImageFolderPopulation

        return ImageFolderPopulation(config)

    from fedexits.data.femnist import CachedPopulation

    if isinstance(config, SyntheticConfig):
        from fedexits.data.synthetic import synthetic_cache

        cache = synthetic_cache(config)
    elif isinstance(config, FemnistLeafConfig):
        from fedexits.data.leaf import leaf_cache

        cache = leaf_cache(config.path, config.cache_dir)
    else:
        from fedexits.data.hub import hub_cache

        cache = hub_cache(config.path, config.cache_dir, config.dataset)
    return CachedPopulation(config.source, cache, config)
