#!/usr/bin/env python3
"""Pack photos into WebDataset tar shards. Usage: python shard_tools/make_shards.py SRC [SRC ...] --out DIR

The command line lives in restorer.tools.make_shards, the logic in restorer.data.sharding (tested there).
"""

import os
import sys

# Run from a checkout without installing: make the repo root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from restorer.tools.make_shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
