"""The two commands launch/slurm/train.sbatch uses:

    python -m restorer slurm plan                       shell assignments for the job script (eval them):
                                                        processes, workers, threads, MASTER_ADDR, MASTER_PORT
    python -m restorer slurm check --config X [k=v ...] on the login node, before sbatch: is the
                                                        config valid and are its shards readable?

What the plan is: restorer.cluster.slurm. It imports no torch: a job starts its trainer seconds sooner.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from restorer.base.cli import Parser, run, warn
from restorer.cluster.slurm import make_plan, shell

PROG = "restorer slurm"


def check(config: Optional[str], overrides: list[str]) -> None:
    """The config and its shards as the trainer will check them at start (ConfigError, one line)."""
    from restorer.train.checks import check_data
    from restorer.formats.config import load_config

    check_data(load_config(config, overrides))


def main(argv: Optional[list[str]] = None) -> int:
    ap = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    sub.add_parser("plan", help="print NPROC_PER_NODE, WORKERS_PER_RANK, THREADS_PER_RANK, MASTER_PORT for eval")
    c = sub.add_parser("check", help="validate a config and its shards before submitting")
    c.add_argument("--config")
    c.add_argument("overrides", nargs="*", metavar="key=value")

    def checked(args) -> int:
        check(args.config, args.overrides)
        print(f"{PROG}: the config and its shards are fine")
        return 0

    def body() -> int:
        args = ap.parse_args(argv)
        if args.command == "plan":
            plan = make_plan(os.environ)
            if plan.warning():
                warn(plan.warning())
            print(shell(plan))
            return 0
        return checked(args)

    return run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
