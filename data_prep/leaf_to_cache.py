"""Convert LEAF FEMNIST JSON (train/ and test/ folders) into fedexits' compact cache.

    python data_prep/leaf_to_cache.py /path/to/leaf/data --cache-dir ~/.cache/fedexits

The cache lands where `build_population({"source": "femnist_leaf", "path": ..., "cache_dir": ...})`
looks for it (keyed by the source path), so running this first just saves the wait later.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fedexits.data.cache import summary_line
from fedexits.data.config import default_cache_dir
from fedexits.data.leaf import leaf_cache
from fedexits.errors import exits_2_on_bad_input


@exits_2_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="LEAF data folder with train/*.json and test/*.json")
    parser.add_argument("--cache-dir", default=default_cache_dir(), help="cache root (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache = leaf_cache(args.source, os.path.abspath(os.path.expanduser(args.cache_dir)))
    print(f"cache: {cache.path}")
    print(summary_line(cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
