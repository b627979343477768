"""restorer COMMAND [ARGS ...]: every tool of the project under one command (`restorer --help`).

The scripts beside it (restorer-train, restorer-restore, ...) run the same `main`s; `python -m
restorer COMMAND` works from a checkout. A command's module is imported only when it runs.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

# command -> (its module, whose main(argv) it runs; what it does)
COMMANDS = {
    "make-shards": ("restorer.tools.make_shards", "pack photos into WebDataset shards with a manifest"),
    "train": ("restorer.train.loop", "train a network (torchrun ... launch/train.py for several processes)"),
    "restore": ("restorer.tools.restore", "remove JPEG artifacts from photos with a trained network"),
    "evaluate": ("restorer.tools.evaluate", "PSNR / SSIM / PSNR-B of the JPEGs and the network's output"),
    "export": ("restorer.tools.export", "export a checkpoint to ONNX, TorchScript or safetensors"),
    "runs": ("restorer.tools.runs", "one table of several runs, best first"),
    "plot": ("restorer.tools.plot", "draw runs' loss and validation curves"),
    "slurm": ("restorer.tools.slurm", "a SLURM job's plan, and a config checked before sbatch"),
    "demo": ("restorer.tools.demo", "train a small network on bundled photos and show what it does"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "usage: restorer COMMAND [ARGS ...]  (restorer COMMAND --help: its options)\n\ncommands:\n" + "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"restorer: error: no command {command!r}; the commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
