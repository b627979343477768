"""Checkpoints, the one owner of their content: what a file holds, its format version, how it is
written (atomically, by rank 0 only) and read, and the network's card derived from it.

A checkpoint is a dict of tensors and plain values (`torch.load(path, map_location="cpu",
weights_only=True)` reads it with no pickled code):

    format, version      "restorer-checkpoint", FORMAT_VERSION
    network              the NetworkSpec: name, options (the conditioning among them), channels, grayscale
    model, ema           the bare network's state_dict (no `module.` / `_orig_mod.` prefixes), its EMA
    optimizer, scaler    the training state
    step, epoch, best_psnr, train_seconds, rng
    config               the resolved config the run trained with

Everyone reads a file through :func:`read_checkpoint` (a :class:`Checkpoint`), which also upgrades
files of earlier versions (`_upgrade`): the one place that knows old layouts.

A run folder holds last.pt (the newest), best.pt (the best validation PSNR), and with
`checkpoint.keep` the step-NNNNNNNN.pt copies of the newest saves. Resuming reads last.pt, or the
newest step copy that loads when last.pt is damaged.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from restorer.data.jpeg import JpegSpec
from restorer.errors import RestorerError, one_line
from restorer.fileio import atomic_open, atomic_path
from restorer.models import NetworkSpec

FORMAT = "restorer-checkpoint"
FORMAT_VERSION = 2  # 1: the network as model_name / model_args, the JPEG settings in data.patch
CARD_FORMAT = "restorer-network"
CARD_VERSION = 2
LAST, BEST = "last.pt", "best.pt"
RUN_FILES = (LAST, BEST, "config.yaml", "metrics.jsonl", "trackers.json", "card.json")  # besides step copies and:
RUN_FOLDERS = ("tb", "val", "wandb")  # TensorBoard events, validation pictures, wandb's offline runs
_STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")
_TEMP_FILE = re.compile(r"^\..+\.tmp\d+$")
# What restore does with any network's output, which another program must do too to match it.
FILE_BOUNDS = ("restore then moves the output (x 255, before rounding) inside the quantization bins of the input's "
               "JPEG file: restorer.data.jpeg.file_bounds(data).project(output)")
QUALITY_INPUT = ("quality: float32 N, the IJG quality (1-100) of each input's JPEG quantization tables "
                 "(restorer.data.jpeg.table_quality; estimated from the pixels when a file has none); "
                 "lower removes more, higher keeps more detail")


class CheckpointError(RestorerError):
    """A checkpoint (or an exported network file) that cannot be used; one line."""


@dataclass
class Checkpoint:
    """A checkpoint's content, typed. `weights` is the bare network's state_dict."""

    network: NetworkSpec
    weights: dict
    ema: Optional[dict] = None
    optimizer: Optional[dict] = None
    scaler: Optional[dict] = None
    step: int = 0
    epoch: int = 0
    best_psnr: float = -math.inf
    train_seconds: float = 0.0
    config: dict = field(default_factory=dict)
    rng: Optional[dict] = None
    path: Optional[Path] = None  # where it was read from (not saved)

    def to_state(self) -> dict:
        state = {"format": FORMAT, "version": FORMAT_VERSION, "network": self.network.to_dict(),
                 "model": self.weights, "optimizer": self.optimizer, "scaler": self.scaler, "step": self.step,
                 "epoch": self.epoch, "best_psnr": self.best_psnr, "train_seconds": self.train_seconds,
                 "config": self.config, "rng": self.rng}
        if self.ema is not None:
            state["ema"] = self.ema
        return state

    @classmethod
    def from_state(cls, state: dict, path: Optional[Path] = None) -> "Checkpoint":
        """CheckpointError (one line) when `state` is not a checkpoint this restorer can use."""
        where = f"{path}: " if path is not None else ""
        if not isinstance(state, dict) or "model" not in state:
            raise CheckpointError(f"{where}not a restorer checkpoint (no model weights)")
        state = _upgrade(state, where)
        try:
            network = NetworkSpec.from_dict(state["network"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}its network record is unreadable") from None
        best = state.get("best_psnr")
        return cls(network=network, weights=state["model"], ema=state.get("ema"), optimizer=state.get("optimizer"),
                   scaler=state.get("scaler"), step=int(state.get("step") or 0), epoch=int(state.get("epoch") or 0),
                   best_psnr=float(best) if best is not None else -math.inf,
                   train_seconds=float(state.get("train_seconds") or 0.0), config=state.get("config") or {},
                   rng=state.get("rng"), path=path)

    @property
    def inference_weights(self) -> dict:
        """What restore, evaluate and export run: the EMA weights when the run kept them."""
        return self.ema if self.ema is not None else self.weights

    def training_jpeg(self) -> Optional[JpegSpec]:
        """The JPEG degradation the network was trained on (None when the file does not say)."""
        jpeg = ((self.config or {}).get("data") or {}).get("jpeg")
        if not isinstance(jpeg, dict):
            return None
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in jpeg.items() if k in JpegSpec.__dataclass_fields__}
        return JpegSpec(**known)

    def card(self) -> dict:
        """What another tool needs to know about the network besides its weights: how to build and
        feed it, and what it was trained on (the qualities restore's guard compares a file with)."""
        data = (self.config or {}).get("data") or {}
        best = self.best_psnr
        trained = self.training_jpeg()
        return {
            "format": CARD_FORMAT, "version": CARD_VERSION,
            "network": self.network.name,
            "options": dict(self.network.options),
            "in_channels": self.network.in_channels,
            "grayscale": self.network.grayscale,
            "conditioning": self.network.conditioning,
            "input": "float32 N x C x H x W in [0, 1]; output the same, clamp to [0, 1]",
            **({"quality_input": QUALITY_INPUT} if self.network.takes_quality else {}),
            "file_bounds": FILE_BOUNDS,
            "training": {**(trained.card() if trained is not None else {}),
                         "patch_size": (data.get("patch") or {}).get("size"), "steps": self.step},
            "validation": {"best_psnr_db": best if math.isfinite(best) else None,
                           "qualities": data.get("val_qualities")},
            "checkpoint": str(self.path) if self.path is not None else None,
        }


def card_qualities(card: dict) -> Optional[tuple[int, int]]:
    """The range of JPEG qualities a card says its network was trained on (cards of version 1 said
    `jpeg_quality`); None when it does not say."""
    training = card.get("training") or {}
    qualities = training.get("qualities") or training.get("jpeg_quality")
    if isinstance(qualities, (list, tuple)) and len(qualities) >= 2:
        return int(min(qualities)), int(max(qualities))
    return None


def _upgrade(state: dict, where: str) -> dict:
    """A state of any earlier format version as the current one (a copy; the file is not touched)."""
    version = state.get("version", 1) if state.get("format", FORMAT) == FORMAT else None
    if version == FORMAT_VERSION:
        return state
    if version != 1:
        raise CheckpointError(f"{where}format version {state.get('version')!r} of {state.get('format')!r}; "
                              f"this restorer reads {FORMAT} versions 1 to {FORMAT_VERSION}")
    # version 1 (before the JPEG quality input): the network as model_name / model_args; the JPEG
    # settings in data.patch and one data.val_quality
    if "model_name" not in state:
        raise CheckpointError(f"{where}not a restorer checkpoint (no network name)")
    args = dict(state.get("model_args") or {})
    channels = int(args.pop("in_channels", 3))
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in (state.get("config") or {}).items()}
    data = config.get("data") or {}
    patch = dict(data.get("patch") or {})
    jpeg = {k: patch.pop(k) for k in ("quality", "chroma", "double_p", "double_quality") if k in patch}
    if "val_quality" in data:
        data["val_qualities"] = [data.pop("val_quality")]
    if data:
        config["data"] = {**data, "patch": patch, "jpeg": jpeg}
    grayscale = bool(patch.get("grayscale", channels == 1))
    weights = state["model"]
    first = weights.get("base.0.weight") if isinstance(weights, dict) else None
    if state["model_name"] == "seed" and first is not None and tuple(first.shape[:1]) == (32,):
        raise CheckpointError(f"{where}it holds the seed network's old layout (first layer 3->32, not the "
                              "document's 3->128); it cannot be loaded into today's SeedNet: train it again")
    return {**state, "format": FORMAT, "version": FORMAT_VERSION, "config": config,
            "network": {"name": state["model_name"], "options": args, "in_channels": channels, "grayscale": grayscale}}


def save_checkpoint(path: str | os.PathLike, checkpoint: Checkpoint) -> None:
    """torch.save to a temporary file beside `path`, fsync, rename: a kill at any moment leaves
    either the previous file or the new one, never a partial one; a failed save leaves nothing."""
    with atomic_open(path, "wb") as f:
        torch.save(checkpoint.to_state(), f)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint at `path`; CheckpointError (one line) for a file that is missing or cannot be used. Tensors and plain values only (`weights_only`): reading runs no pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated zip, a pickle error: the file is not usable
        raise CheckpointError(f"cannot read checkpoint {path}: {one_line(e)}") from None
    return Checkpoint.from_state(state, path)


def step_copies(out_dir: Path) -> list[Path]:
    """The step-NNNNNNNN.pt copies, oldest first."""
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if _STEP_FILE.match(p.name))


def load_latest(out_dir: Path) -> Optional[Checkpoint]:
    """last.pt, or, when it does not load, the newest step copy that does, or best.pt (with a
    warning on stderr). None when the folder has no checkpoint; CheckpointError (one line) when
    there are checkpoints but none loads."""
    candidates = [p for p in [out_dir / LAST, *reversed(step_copies(out_dir)), out_dir / BEST] if p.is_file()]
    failures = []
    for path in candidates:
        try:
            checkpoint = read_checkpoint(path)
        except (CheckpointError, OSError) as e:  # a truncated zip, a pickle error, a wrong object: try the next
            failures.append(f"{path.name}: {one_line(e)}")
            continue
        if failures:
            print(f"restorer: warning: {'; '.join(failures)}; resuming from {path.name} (step {checkpoint.step}) instead",
                  file=sys.stderr, flush=True)
        return checkpoint
    if failures:
        raise CheckpointError(f"no checkpoint in {out_dir} can be loaded ({'; '.join(failures)}); "
                              "move them away to start again, or set train.resume=false train.overwrite=true")
    return None


def best_psnr_on_disk(out_dir: Path) -> Optional[float]:
    """The validation PSNR best.pt was saved for (what a resumed run must beat), or None."""
    with contextlib.suppress(Exception):
        return read_checkpoint(out_dir / BEST).best_psnr
    return None


def keep_step_copy(out_dir: Path, step: int, keep: int) -> None:
    """step-NNNNNNNN.pt, the last.pt just written, as a hard link (no second write; the next save
    renames a new file over last.pt and leaves the link alone), or a copy where links do not work;
    then delete all but the newest `keep` copies."""
    with atomic_path(out_dir / f"step-{step:08d}.pt") as tmp:
        try:
            os.link(out_dir / LAST, tmp)
        except OSError:
            shutil.copyfile(out_dir / LAST, tmp)
    for old in step_copies(out_dir)[:-keep]:
        old.unlink()


def run_files(out_dir: Path) -> list[Path]:
    """What an earlier run left in out_dir (checkpoints, config, metrics, TensorBoard events, pictures,
    tracker runs)."""
    if not out_dir.is_dir():
        return []
    found = [out_dir / n for n in RUN_FILES if (out_dir / n).is_file()] + step_copies(out_dir)
    return found + [out_dir / n for n in RUN_FOLDERS if (out_dir / n).is_dir()]


def remove_run_files(out_dir: Path) -> None:
    """Delete an earlier run's files (train.overwrite=true): nothing of it mixes with the new run."""
    for path in run_files(out_dir):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def remove_stale_temp_files(out_dir: Path) -> None:
    """Temporary files of saves that a SIGKILL interrupted (never of a live writer: rank 0 owns the folder)."""
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            if _TEMP_FILE.match(p.name):
                with contextlib.suppress(OSError):
                    p.unlink()
