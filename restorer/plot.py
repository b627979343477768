"""A run's curves without TensorBoard: training loss and validation PSNR (network and JPEG input)
over the steps, from its metrics.jsonl.

    python -m restorer.plot RUN_DIR [--out FILE.png]        (default RUN_DIR/curves.png)

Needs matplotlib (pip install -e '.[plot]'). Resumed runs are drawn as one run: a step logged twice
(work redone after a restart from an older checkpoint) keeps its last value.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from restorer.cli import Parser, UsageError, run
from restorer.fileio import atomic_open


def read_metrics(run_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """({step: training record}, {step: validation record}) from RUN_DIR/metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"no metrics.jsonl in {run_dir} (is it a run folder, train.out_dir?)")
    train, val = {}, {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(f"plot: warning: {path} line {n} is not JSON (a write cut short?): skipped", file=sys.stderr)
            continue
        if "loss" in record:
            train[record["step"]] = record
        elif "val_psnr" in record:
            val[record["step"]] = record
    if not train and not val:
        raise UsageError(f"{path} has no training or validation lines yet")
    return train, val


def draw(run_dir: Path, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install -e '.[plot]'") from None
    train, val = read_metrics(run_dir)
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    steps = sorted(train)
    loss_ax.plot(steps, [train[s]["loss"] for s in steps], label="network")
    loss_ax.plot(steps, [train[s]["target"] for s in steps], label="JPEG input (target)", alpha=0.7)
    loss_ax.set(xlabel="step", ylabel="training loss", title="loss", yscale="log")
    steps = sorted(val)
    val_ax.plot(steps, [val[s]["val_psnr"] for s in steps], marker="o", label="network")
    val_ax.plot(steps, [val[s]["val_psnr_jpeg"] for s in steps], linestyle="--", label="JPEG input")
    val_ax.set(xlabel="step", ylabel="PSNR (dB)", title="validation")
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    p = Parser(prog="python -m restorer.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run folder (train.out_dir)")
    p.add_argument("--out", help="the picture (default RUN_DIR/curves.png)")

    def body() -> int:
        args = p.parse_args(argv)
        run_dir = Path(args.run_dir)
        out = Path(args.out) if args.out else run_dir / "curves.png"
        draw(run_dir, out)
        print(f"plot: {out}")
        return 0

    return run("plot", body)


if __name__ == "__main__":
    sys.exit(main())
