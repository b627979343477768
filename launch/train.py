#!/usr/bin/env python3
"""Entry point for torchrun (and plain python): the loop lives in restorer/train/loop.py.

    torchrun --nproc_per_node=4 launch/train.py --config configs/gpu.yaml data.shards=/data/shards
    python launch/train.py --config configs/cpu.yaml
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from restorer.train.loop import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
