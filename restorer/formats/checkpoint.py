"""Checkpoints, the one owner of their content: what a file holds, its format version, how it is
written (atomically, by rank 0 only) and read, and the network's card derived from it.

A checkpoint is a dict of tensors and plain values (`torch.load(path, map_location="cpu",
weights_only=True)` reads it with no pickled code):

    format, version      "restorer-checkpoint", FORMAT_VERSION
    network              the NetworkSpec: name, options (the conditioning among them), channels, grayscale
    model, ema           the bare network's state_dict (no `module.` / `_orig_mod.` prefixes), its EMA
    optimizer, scaler    the training state
    step, epoch, best_psnr, train_seconds
    world_size, global_batch   the ranks it ran on, and the patches of a step (world x batch x grad_accum)
    data                 where the training stream is (restorer.train.loader: its step, images, seed)
    rng                  the random generators' states (torch's, and each CUDA device's)
    config               the resolved config the run trained with

The trainer's parts with state (the training bundle, the run's progress, the data stream, the
generators) each give and take their own fields (`state_dict` / `load_state_dict`, the Stateful
protocol); :meth:`Checkpoint.of` assembles a checkpoint of them and checks every field, and
:meth:`Checkpoint.load_into` hands each part the whole state to take its own from.

Everyone reads a file through :func:`read_checkpoint` (a :class:`Checkpoint`), which also upgrades
files of earlier versions (`_upgrade`): the one place that knows old layouts.

A run folder holds last.pt (the newest), best.pt (the best validation PSNR), and with
`checkpoint.keep` the step-NNNNNNNN.pt copies of the newest saves. Resuming reads last.pt, or the
newest step copy that loads when last.pt is damaged.

The run folder's names and what the trainer may delete there are restorer.formats.run_folder's.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence

import torch

from restorer.base.cli import warn
from restorer.data.jpeg import JpegSpec
from restorer.base.errors import RestorerError, one_line
from restorer.base.fileio import atomic_open, atomic_path
from restorer.models import NetworkSpec
from restorer.formats.run_folder import BEST, LAST, RunFolder, step_copies, step_copy

FORMAT = "restorer-checkpoint"
FORMAT_VERSION = 2  # 1: the network as model_name / model_args, the JPEG settings in data.patch
CARD_FORMAT = "restorer-network"
CARD_VERSION = 2
# What restore does with any network's output, which another program must do too to match it.
FILE_BOUNDS = ("restore then moves the output (x 255, before rounding) inside the quantization bins of the input's "
               "JPEG file: restorer.data.jpeg.file_bounds(data).project(output)")
QUALITY_INPUT = ("quality: float32 N, the IJG quality (1-100) of each input's JPEG quantization tables "
                 "(restorer.data.jpeg.table_quality; estimated from the pixels when a file has none); "
                 "lower removes more, higher keeps more detail")


class CheckpointError(RestorerError):
    """A checkpoint (or an exported network file) that cannot be used; one line."""


class Stateful(Protocol):
    """A part of a run with state: its fields of a checkpoint (the file's own names: model, step, ...)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


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
    world_size: int = 1
    global_batch: int = 0  # 0: not recorded (a checkpoint of an earlier restorer)
    data: Optional[dict] = None
    path: Optional[Path] = None  # where it was read from (not saved)

    @classmethod
    def of(cls, network: NetworkSpec, config: dict, parts: Sequence[Stateful]) -> "Checkpoint":
        """A checkpoint of the parts' fields (each part gives its own; none gives another's)."""
        state = {"format": FORMAT, "version": FORMAT_VERSION, "network": network.to_dict(), "config": config}
        for part in parts:
            fields = part.state_dict()
            clash = state.keys() & fields.keys()
            if clash:
                raise ValueError(f"{type(part).__name__} gives {', '.join(sorted(clash))}, which another part gave")
            state.update(fields)
        return cls.from_state(state)

    def load_into(self, parts: Sequence[Stateful]) -> None:
        """Hand each part the whole state: it takes its own fields."""
        state = self.to_state()
        for part in parts:
            part.load_state_dict(state)

    def to_state(self) -> dict:
        state = {"format": FORMAT, "version": FORMAT_VERSION, "network": self.network.to_dict(),
                 "model": self.weights, "optimizer": self.optimizer, "scaler": self.scaler, "step": self.step,
                 "epoch": self.epoch, "best_psnr": self.best_psnr, "train_seconds": self.train_seconds,
                 "config": self.config, "rng": self.rng, "world_size": self.world_size,
                 "global_batch": self.global_batch, "data": self.data}
        if self.ema is not None:
            state["ema"] = self.ema
        return state

    @classmethod
    def from_state(cls, state: dict, path: Optional[Path] = None) -> "Checkpoint":
        """CheckpointError (one line, naming the field) when `state` is not a checkpoint this restorer
        can use: every field is checked for its type here, so that nothing downstream meets a string
        step or a list of weights (and load_latest can fall back to an older file)."""
        where = f"{path}: " if path is not None else ""
        if not isinstance(state, dict) or "model" not in state:
            raise CheckpointError(f"{where}not a restorer checkpoint (no model weights)")
        state = _upgrade(state, where)

        def checked(name: str, ok, expected: str, default=None):
            value = state.get(name)
            if value is None:
                return default  # a field left out (an exported network has no optimizer)
            if not ok(value):
                raise CheckpointError(f"{where}its {name} is {_described(value)}, not {expected}")
            return value

        weights = checked("model", _is_weights, "a dict of tensors")
        ema = checked("ema", _is_weights, "a dict of tensors")
        network = checked("network", _is_network_record, "a network record (name, options, in_channels, grayscale)")
        if weights is None or network is None:
            missing = "model weights" if weights is None else "network record"
            raise CheckpointError(f"{where}not a restorer checkpoint (no {missing})")
        optimizer = checked("optimizer", lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                           and isinstance(v.get("param_groups"), list)
                           and all(isinstance(g, dict) for g in v["param_groups"]),
                           "an optimizer state (state, param_groups)")
        scaler = checked("scaler", lambda v: isinstance(v, dict), "a dict")
        step = checked("step", _is_count, "a whole number >= 0", 0)
        epoch = checked("epoch", _is_count, "a whole number >= 0", 0)
        best = checked("best_psnr", lambda v: _is_number(v) and not math.isnan(v), "a number", -math.inf)
        seconds = checked("train_seconds", lambda v: _is_number(v) and 0 <= v < math.inf, "a number of seconds", 0.0)
        config = checked("config", lambda v: isinstance(v, dict), "a dict", {})
        rng = checked("rng", lambda v: isinstance(v, dict) and isinstance(v.get("torch"), torch.Tensor)
                     and v["torch"].dtype == torch.uint8 and v["torch"].shape == torch.get_rng_state().shape
                     and isinstance(v.get("cuda", []), list)
                     and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in v.get("cuda", [])),
                     "a dict of the torch generators' states")
        world_size = checked("world_size", lambda v: _is_count(v) and v >= 1, "a whole number >= 1", 1)
        global_batch = checked("global_batch", _is_count, "a whole number >= 0", 0)
        data = checked("data", lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_plain(x)
                                                                    for k, x in v.items()),
                       "a dict of plain values")
        return cls(network=NetworkSpec.from_dict(network), weights=weights, ema=ema, optimizer=optimizer,
                   scaler=scaler, step=step, epoch=epoch, best_psnr=float(best), train_seconds=float(seconds),
                   config=config, rng=rng, world_size=world_size, global_batch=global_batch, data=data, path=path)

    @property
    def inference_weights(self) -> dict:
        """What restore, evaluate and export run: the EMA weights when the run kept them."""
        return self.ema if self.ema is not None else self.weights

    def training_jpeg(self) -> Optional[JpegSpec]:
        """The JPEG degradation the network was trained on (None when the file does not say, or says
        something that is not one: a config is whatever a file held)."""
        jpeg = _section(self.config, "data").get("jpeg")
        if not isinstance(jpeg, dict):
            return None
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in jpeg.items() if k in JpegSpec.__dataclass_fields__}
        if not all(map(_is_plain, known.values())):
            return None
        try:
            spec = JpegSpec(**known)
            spec.validate()
        except (TypeError, ValueError):
            return None
        return spec

    def card(self) -> dict:
        """What another tool needs to know about the network besides its weights: how to build and
        feed it, and what it was trained on (the qualities restore's guard compares a file with).
        Plain JSON values, whatever the checkpoint's config holds (what it cannot say is null)."""
        data = _section(self.config, "data")
        patch = _section(data, "patch")
        # (a config from before photo_side existed trained with it off)
        patch_size, photo_side = patch.get("size"), patch.get("photo_side", 0 if patch else None)
        qualities = data.get("val_qualities")
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
                         "patch_size": patch_size if _is_count(patch_size) else None,
                         "photo_side": photo_side if _is_count(photo_side) else None, "steps": self.step},
            "validation": {"best_psnr_db": best if math.isfinite(best) else None,
                           "qualities": qualities if isinstance(qualities, list) and all(map(_is_number, qualities))
                           else None},
            "checkpoint": str(self.path) if self.path is not None else None,
        }


def _section(tree, key: str) -> dict:
    """tree[key] when both are dicts, else {} (a config read from a file may hold anything)."""
    value = tree.get(key) if isinstance(tree, dict) else None
    return value if isinstance(value, dict) else {}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_plain(value) -> bool:
    """A JSON value of numbers, strings, booleans and lists of them (not a tensor, a dict)."""
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float))


def _is_weights(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _is_network_record(value) -> bool:
    options = value.get("options") if isinstance(value, dict) else None
    return (isinstance(value, dict) and isinstance(value.get("name"), str)
            and (options is None or (isinstance(options, dict)
                                     and all(isinstance(k, str) and _is_plain(v) for k, v in options.items())))
            and _is_count(value.get("in_channels")) and value["in_channels"] >= 1
            and isinstance(value.get("grayscale"), bool))


def _described(value) -> str:
    """A field's value as an error names it: its type, and the value itself when it is short."""
    shown = f" {one_line(repr(value), 40)}" if isinstance(value, (str, int, float, bool)) else ""
    return f"{'None' if value is None else type(value).__name__}{shown}"


def card_qualities(card: dict) -> Optional[tuple[int, int]]:
    """The range of JPEG qualities a card says its network was trained on (cards of version 1 said
    `jpeg_quality`); None when it does not say."""
    training = _section(card, "training")
    qualities = training.get("qualities") or training.get("jpeg_quality")
    if isinstance(qualities, (list, tuple)) and len(qualities) >= 2 and all(_is_number(q) and 1 <= q <= 100
                                                                           for q in qualities):
        return int(min(qualities)), int(max(qualities))
    return None


def _upgrade(state: dict, where: str) -> dict:
    """A state of any earlier format version as the current one (a copy; the file is not touched)."""
    fmt, version = state.get("format", FORMAT), state.get("version", 1)
    if not (isinstance(fmt, str) and fmt == FORMAT and type(version) is int and version in (1, FORMAT_VERSION)):
        raise CheckpointError(f"{where}format version {_described(version)} of {_described(fmt)}; "
                              f"this restorer reads {FORMAT} versions 1 to {FORMAT_VERSION}")
    if version == FORMAT_VERSION:
        return state
    # version 1 (before the JPEG quality input): the network as model_name / model_args; the JPEG
    # settings in data.patch and one data.val_quality
    if not isinstance(state.get("model_name"), str):
        raise CheckpointError(f"{where}not a restorer checkpoint (no network name)")
    for name in ("model_args", "config"):
        if not isinstance(state.get(name) or {}, dict):
            raise CheckpointError(f"{where}its {name} is {_described(state[name])}, not a dict")
    args = dict(state.get("model_args") or {})
    channels = args.pop("in_channels", 3)
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in (state.get("config") or {}).items()}
    data = _section(config, "data")
    patch = dict(_section(data, "patch"))
    jpeg = {k: patch.pop(k) for k in ("quality", "chroma", "double_p", "double_quality") if k in patch}
    if "val_quality" in data:
        data["val_qualities"] = [data.pop("val_quality")]
    if data:
        config["data"] = {**data, "patch": patch, "jpeg": jpeg}
    grayscale = bool(patch.get("grayscale", channels == 1))
    weights = state["model"]
    first = weights.get("base.0.weight") if isinstance(weights, dict) else None
    if state["model_name"] == "seed" and isinstance(first, torch.Tensor) and tuple(first.shape[:1]) == (32,):
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
            warn(f"{'; '.join(failures)}; resuming from {path.name} (step {checkpoint.step}) instead")
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


def keep_step_copy(folder: RunFolder, step: int, keep: int) -> None:
    """step-NNNNNNNN.pt, the last.pt just written, as a hard link (no second write; the next save
    renames a new file over last.pt and leaves the link alone), or a copy where links do not work;
    then delete all but the newest `keep` of the copies the run folder's marker says are the run's."""
    out_dir = folder.path
    with atomic_path(out_dir / step_copy(step)) as tmp:
        try:
            os.link(out_dir / LAST, tmp)
        except OSError:
            shutil.copyfile(out_dir / LAST, tmp)
    for old in [p for p in step_copies(out_dir) if folder.owns(p.name)][:-keep]:
        old.unlink()
