"""A run's curves without TensorBoard: training loss and validation PSNR (network and JPEG input)
over the steps, from its metrics.jsonl; or several runs' curves in the same two panels.

    python -m restorer plot RUN_DIR [--out FILE.png]        (default RUN_DIR/curves.png)
    python -m restorer plot RUN_DIR RUN_DIR ... --out FILE.png

Several runs (a sweep: python -m restorer plot runs/sweep-* --out sweep.png) share the panels, one
colour a run, each labelled by the settings that set it apart from the others (the keys of their
config.yaml that differ, as python -m restorer runs shows them: "optim.lr=0.002"); the validation
panel draws the JPEG input's PSNR dashed in the run's colour. With several runs --out is required.

Needs matplotlib (pip install -e '.[plot]'). Resumed runs are drawn as one run: a step logged twice
(work redone after a restart from an older checkpoint) keeps its last value. A line of metrics.jsonl
that is not a record is skipped with a warning that counts them (as python -m restorer runs); --out
is never a run's metrics.jsonl or config.yaml (refused, exit 2).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from restorer.base.cli import Parser, UsageError, run
from restorer.base.fileio import atomic_open, refuse_overwrites
from restorer.formats.run_folder import CURVES, METRICS, read_records, warn_skipped
from restorer.tools.runs import differing_keys, read_config, run_inputs, run_labels

PROG = "restorer plot"


def read_metrics(run_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """({step: training record}, {step: validation record}) from RUN_DIR/metrics.jsonl."""
    path = run_dir / METRICS
    if not path.is_file():
        raise UsageError(f"no metrics.jsonl in {run_dir} (is it a run folder, train.out_dir?)")
    records, bad = read_records(path)
    warn_skipped(path, bad)
    train, val = {}, {}
    for record in records:
        if "loss" in record:
            train[record["step"]] = record
        elif "val_psnr" in record:
            val[record["step"]] = record
    if not train and not val:
        raise UsageError(f"{path} has no training or validation lines yet")
    return train, val


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install -e '.[plot]'") from None
    return plt


def loss_scale(values) -> str:
    """A log axis for losses that are positive (MSE, L1); linear for optim.loss=psnr, which is minus
    a PSNR in dB (negative)."""
    return "log" if all(v > 0 for v in values) else "linear"


def draw(run_dir: Path, out: Path) -> None:
    plt = _pyplot()
    train, val = read_metrics(run_dir)
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    steps = sorted(train)
    loss_ax.plot(steps, [train[s]["loss"] for s in steps], label="network")
    loss_ax.plot(steps, [train[s]["target"] for s in steps], label="JPEG input (target)", alpha=0.7)
    loss_ax.set(xlabel="step", ylabel="training loss", title="loss",
                yscale=loss_scale([v for s in steps for v in (train[s]["loss"], train[s]["target"])]))
    steps = sorted(val)
    val_ax.plot(steps, [val[s]["val_psnr"] for s in steps], marker="o", label="network")
    val_ax.plot(steps, [val[s]["val_psnr_jpeg"] for s in steps], linestyle="--", label="JPEG input")
    val_ax.set(xlabel="step", ylabel="PSNR (dB)", title="validation")
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    save(plt, fig, out)


def draw_runs(run_dirs: list[Path], out: Path) -> None:
    """Several runs in the same two panels, one colour a run, labelled by what differs between them."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    metrics = [read_metrics(d) for d in run_dirs]  # every folder checked before anything is drawn
    configs = [read_config(d) for d in run_dirs]
    labels = run_labels(run_dirs, configs)
    keys = differing_keys(configs)
    legend_rows = math.ceil(len(run_dirs) / 2)
    height = 4 + 0.22 * legend_rows
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(11, height), dpi=100)
    handles = []
    for i, ((train, val), label) in enumerate(zip(metrics, labels)):
        style = {"color": f"C{i % 10}", "linestyle": ("-", "-.", ":")[i // 10 % 3]}
        steps = sorted(train)
        handles += loss_ax.plot(steps, [train[s]["loss"] for s in steps], label=label, **style)
        steps = sorted(val)
        val_ax.plot(steps, [val[s]["val_psnr"] for s in steps], marker="o", markersize=3, **style)
        val_ax.plot(steps, [val[s]["val_psnr_jpeg"] for s in steps], color=style["color"], linestyle="--",
                    alpha=0.5, linewidth=1)
    loss_ax.set(xlabel="step", ylabel="training loss", title="loss (network)",
                yscale=loss_scale([train[s]["loss"] for train, _ in metrics for s in train]))
    val_ax.set(xlabel="step", ylabel="PSNR (dB)", title="validation")
    val_ax.legend(handles=[Line2D([], [], color="gray", marker="o", markersize=3, label="network"),
                           Line2D([], [], color="gray", linestyle="--", alpha=0.5, label="JPEG input")],
                  fontsize="small")
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 2), fontsize="small", frameon=False)
    fig.suptitle(f"{len(run_dirs)} runs" + (f", differing in {', '.join(keys)}" if keys else ""))
    fig.tight_layout(rect=(0, (0.22 * legend_rows + 0.15) / height, 1, 1))
    save(plt, fig, out)


def save(plt, fig, out: Path) -> None:
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (train.out_dir); several: drawn together")
    p.add_argument("--out", help="the picture (one run: default RUN_DIR/curves.png; several runs: required)")

    def body() -> int:
        args = p.parse_args(argv)
        run_dirs = list(dict.fromkeys(Path(d) for d in args.run_dirs))
        if len(run_dirs) > 1 and not args.out:
            raise UsageError(f"{len(run_dirs)} runs: say where their picture goes with --out FILE.png")
        out = Path(args.out) if args.out else run_dirs[0] / CURVES
        refuse_overwrites([("--out", out)], run_inputs(run_dirs), hint="draw the picture elsewhere")
        if len(run_dirs) == 1:
            draw(run_dirs[0], out)
        else:
            draw_runs(run_dirs, out)
        print(f"{PROG}: {out}")
        return 0

    return run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
