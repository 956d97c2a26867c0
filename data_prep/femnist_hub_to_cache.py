"""Convert FEMNIST from Flower's dataset hub (or local parquet files) into fedexits' compact cache.

    python data_prep/femnist_hub_to_cache.py --cache-dir ~/.cache/fedexits            # download
    python data_prep/femnist_hub_to_cache.py --parquet data/femnist/ --cache-dir ...  # local files

The cache lands where `build_population({"source": "femnist_hub", "path": ..., "cache_dir": ...})`
looks for it, so running this once makes every later run (and client process) offline and fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fedexits.data.cache import summary_line
from fedexits.data.config import default_cache_dir
from fedexits.data.hub import HUB_DATASET, hub_cache
from fedexits.errors import exits_2_on_bad_input


@exits_2_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parquet",
        nargs="+",
        default=None,
        help="parquet file(s) or folder(s) in the hub schema; omit to download",
    )
    parser.add_argument("--dataset", default=HUB_DATASET, help="hub dataset id (default: %(default)s)")
    parser.add_argument("--cache-dir", default=default_cache_dir(), help="cache root (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = None if args.parquet is None else (args.parquet[0] if len(args.parquet) == 1 else args.parquet)
    cache = hub_cache(path, os.path.abspath(os.path.expanduser(args.cache_dir)), args.dataset)
    print(f"cache: {cache.path}")
    print(summary_line(cache))
    print(f"dark-on-white images inverted: {cache.info.get('inverted', 0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
