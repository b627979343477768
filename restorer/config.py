"""Typed configuration, the whole tree in one place: dataclasses loaded from YAML, overridden by
`section.key=value` arguments, checked before anything starts. Every mistake becomes one
ConfigError line naming the key ("key: must be ..., got ...").

    Config
      data       DataConfig (below): shards, loader, validation
        patch    restorer.data.patches.PatchSpec: the clean patches
        jpeg     restorer.data.jpeg.JpegSpec: their JPEG degradation
      model      ModelConfig: name, preset, and each network's options (restorer.models.*Options)
      optim      OptimConfig          train  TrainConfig
      checkpoint CheckpointConfig     log    LogConfig

A choice is a `Literal[...]` field, checked by restorer.choices.check_choices. A new key: a field
in its section's dataclass here (or in the network's or spec's own, which this file imports)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from restorer.choices import Literal, check_choices
from restorer.data.jpeg import JpegSpec
from restorer.data.patches import PatchSpec
from restorer.errors import RestorerError
from restorer.models import MODELS, DnCNNOptions, NAFNetOptions, NetworkSpec, SeedOptions, UNetOptions


class ConfigError(RestorerError):
    """A bad config file, key or value; the message is one line."""


@dataclass
class DataConfig:
    """Where the training pairs come from and how they are made (restorer.data.pipeline)."""

    shards: str = ""  # a shard folder or its manifest.json
    train_urls: str = ""  # instead of the manifest's list: any URL pattern webdataset reads
    val_urls: str = ""  # (brace patterns, pipe:aws s3 cp s3://... -, http://...)
    epoch_samples: int = 0  # patches per epoch; 0: every training image once, patches_per_image each
    patch: PatchSpec = field(default_factory=PatchSpec)  # the clean patches: size, rescale, rotation, colour
    jpeg: JpegSpec = field(default_factory=JpegSpec)  # their JPEG: qualities, chroma, double JPEG
    patches_per_image: int = 256  # patches cut from each decoded image: a decode costs ~100 patches
    shuffle_buffer: int = 2048  # patches held per stream, ~50 KB each at patch 128
    workers: int = 4  # DataLoader worker processes per rank
    val_crop: int = 256  # validation: centre crop of at most this side ...
    val_qualities: tuple[int, ...] = (10,)  # ... JPEG-encoded at each of these qualities (jpeg.chroma's subsampling)
    verify: bool = False  # at start, check every shard's sha256 against the manifest (sizes are always checked)
    allow_pipe: bool = False  # let train_urls/val_urls use pipe: (it runs a shell command on every rank and worker)

    def validate(self) -> None:
        """Raise ValueError naming the field that is wrong."""
        if not (self.shards or self.train_urls):
            raise ValueError("shards: must be a shard folder (or its manifest.json), or set train_urls")
        if self.train_urls and not self.shards and self.epoch_samples <= 0:
            raise ValueError(f"epoch_samples: must be > 0 when train_urls is used without a manifest, got {self.epoch_samples}")
        for name in ("patches_per_image", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")
        if self.val_crop < 16:  # whole 8x8 blocks, at least SSIM's 11x11 window
            raise ValueError(f"val_crop: must be >= 16 (SSIM's window is 11x11), got {self.val_crop}")
        for name in ("train_urls", "val_urls"):
            if "pipe:" in getattr(self, name) and not self.allow_pipe:
                raise ValueError(f"{name}: a pipe: URL runs a shell command on every rank and worker: "
                                 "set data.allow_pipe=true if you mean it")
        if not self.val_qualities or not all(1 <= q <= 100 for q in self.val_qualities):
            raise ValueError(f"val_qualities: must be one or more qualities in 1..100, got {list(self.val_qualities)}")
        for name in ("patch", "jpeg"):
            try:
                getattr(self, name).validate()
            except ValueError as e:
                raise ValueError(f"{name}.{e}") from None


@dataclass
class ModelConfig:
    """The network: `name` picks it, its own section holds its options (defaults: its CPU budget),
    `preset` fills that section from the network's named presets (keys given explicitly win)."""

    name: str = "seed"  # a key of restorer.models.MODELS
    preset: str = ""  # cpu | gpu (see each network's PRESETS); "" = the section as written
    seed: SeedOptions = field(default_factory=SeedOptions)
    dncnn: DnCNNOptions = field(default_factory=DnCNNOptions)
    unet: UNetOptions = field(default_factory=UNetOptions)
    nafnet: NAFNetOptions = field(default_factory=NAFNetOptions)

    def validate(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"name: must be one of {', '.join(sorted(MODELS))}, got {self.name!r}")
        try:
            getattr(self, self.name).validate()
        except ValueError as e:
            raise ValueError(f"{self.name}.{e}") from None

    def options(self) -> dict:
        """The chosen network's options as plain values (what build_model takes, and checkpoints keep)."""
        return _plain(dataclasses.asdict(getattr(self, self.name)))


def apply_preset(raw: dict) -> None:
    """Fill raw["model"][name] from the network's preset named by raw["model"]["preset"], under the
    keys the file and the overrides give explicitly."""
    model = raw.get("model")
    if not isinstance(model, dict) or not model.get("preset"):
        return
    name, preset = model.get("name", ModelConfig.name), model["preset"]
    presets = getattr(MODELS.get(name), "PRESETS", None)
    if presets is None:
        return  # an unknown name: validate() says so
    if preset not in presets:
        raise ConfigError(f"model.preset: {name} has no preset {preset!r} (presets: {', '.join(presets)})")
    own = model.get(name) or {}
    if not isinstance(own, dict):
        raise ConfigError(f"model.{name}: expected a section (mapping), got {own!r}")
    model[name] = {**presets[preset], **own}


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw"] = "adam"
    lr: float = 5e-4
    last_lr_scale: float = 0.5  # the network's output layer (its last_layer()) at lr x this (the seed: 0.5)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    loss: Literal["mse_sum", "mse", "l1", "charbonnier", "psnr"] = "mse_sum"  # mse_sum: the seed's MSELoss(reduction='sum')
    charbonnier_eps: float = 1e-3  # charbonnier: mean of sqrt((out - target)^2 + eps^2)
    grad_clip: float = 0.0  # max gradient norm; 0: off
    schedule: Literal["constant", "cosine", "step"] = "constant"  # constant: the seed's
    warmup_steps: int = 0
    min_lr_scale: float = 0.0  # cosine: the lr it ends at, as a fraction of lr
    step_every: int = 0  # step schedule: multiply the lr by step_gamma every this many steps
    step_gamma: float = 0.5
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0: off

    def validate(self) -> None:
        check_choices(self)
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema: must be in [0, 1), got {self.ema}")
        if self.schedule == "step" and self.step_every <= 0:
            raise ValueError(f"step_every: must be > 0 for the step schedule, got {self.step_every}")
        for key in ("warmup_steps", "grad_clip", "weight_decay", "last_lr_scale", "min_lr_scale", "charbonnier_eps"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0, got {getattr(self, key)}")


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"  # the run directory: config.yaml, metrics.jsonl, last.pt, best.pt
    epochs: int = 100
    max_steps: int = 0  # stop after this many optimizer steps; > 0 takes precedence over epochs
    max_minutes: float = 0.0  # also stop after this much training time (resumes add up); the lr schedule
    #                           then runs by the time spent or the steps done, whichever is further on
    batch_size: int = 8  # per rank and per micro-step: the global batch is x ranks x grad_accum
    grad_accum: int = 1
    seed: int = 0
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: cuda when available
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16, fp16: autocast (a GradScaler only for fp16)
    channels_last: bool = False
    compile: bool = False
    resume: bool = True  # continue from out_dir/last.pt when it exists; false starts fresh
    overwrite: bool = False  # starting fresh in a folder that holds another run deletes that run's files
    max_nonfinite: int = 20  # this many non-finite losses in a row stop the run
    stop_grace_s: float = 25.0  # after SIGTERM/SIGUSR1, exit by force if a step never ends
    collective_timeout_s: float = 600.0  # a collective (all-reduce, broadcast) that waits longer fails the run

    def validate(self) -> None:
        check_choices(self)
        for key in ("epochs", "batch_size", "grad_accum", "max_nonfinite"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps: must be >= 0, got {self.max_steps}")
        if self.stop_grace_s <= 0:
            raise ValueError(f"stop_grace_s: must be > 0, got {self.stop_grace_s}")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"collective_timeout_s: must be > 0, got {self.collective_timeout_s}")
        if self.max_minutes < 0:
            raise ValueError(f"max_minutes: must be >= 0, got {self.max_minutes}")
        if not self.out_dir:
            raise ValueError("out_dir: must be a folder, got ''")


@dataclass
class CheckpointConfig:
    every: int = 1000  # write last.pt every this many steps (and at the end)
    keep: int = 0  # also keep step-NNNNNNNN.pt copies of the last this many saves; 0: none

    def validate(self) -> None:
        if self.every < 1:
            raise ValueError(f"every: must be >= 1, got {self.every}")
        if self.keep < 0:
            raise ValueError(f"keep: must be >= 0, got {self.keep}")


@dataclass
class LogConfig:
    every: int = 50  # a metrics.jsonl line every this many steps
    val_every: int = 1000  # validate every this many steps (and at the end); 0: only at the end
    progress: bool = True  # rank 0's tqdm bar
    tensorboard: bool = True  # scalars into out_dir/tb when the tensorboard package is installed
    pictures: int = 3  # a before/after picture at each validation, out_dir/val/step-N.png: keep the last N; 0: none
    wandb: bool = False  # log to Weights & Biases (the wandb extra); its files in out_dir/wandb
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: `wandb sync` later (WANDB_MODE, if set, wins)
    wandb_project: str = "restorer"
    wandb_entity: str = ""  # "" = your default entity
    wandb_name: str = ""  # "" = the run folder's name
    wandb_tags: tuple[str, ...] = ()
    mlflow: str = ""  # log to MLflow (the mlflow extra) at this tracking URI: a folder, sqlite:///runs/mlflow.db, http://host:5000
    mlflow_experiment: str = "restorer"

    def validate(self) -> None:
        check_choices(self)
        if self.every < 1:
            raise ValueError(f"every: must be >= 1, got {self.every}")
        if self.val_every < 0:
            raise ValueError(f"val_every: must be >= 0, got {self.val_every}")
        if self.pictures < 0:
            raise ValueError(f"pictures: must be >= 0, got {self.pictures}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            try:
                getattr(self, f.name).validate()
            except ValueError as e:
                raise ConfigError(f"{f.name}.{e}") from None

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def network(self) -> NetworkSpec:
        """The network this config trains: what checkpoints record and rebuild it from."""
        return NetworkSpec(self.model.name, self.model.options(), self.data.patch.channels, self.data.patch.grayscale)


def _plain(obj: Any) -> Any:
    """Tuples to lists, recursively: YAML- and torch.load(weights_only)-friendly."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- building from dicts


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as type `hint`, or ConfigError naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:  # a choice: read as its values' type (420 -> "420"); validate() checks the choice
        if all(isinstance(a, str) for a in args) and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return from_dict(hint, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {list(value)}")
        item_hints = [args[0]] * len(value) if (origin is list or args[-1] is Ellipsis) else list(args)
        items = [_coerce(v, h, f"{key}[{i}]") for i, (v, h) in enumerate(zip(value, item_hints))]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {hint} for {key}")


def from_dict(cls: type, values: dict, prefix: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys are errors that list the valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key {full}; valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def apply_override(raw: dict, override: str) -> None:
    """Apply `a.b.c=value` to a nested dict; the value is parsed as YAML (10, 1e-3, true, [10, 60])."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not key=value (for example train.max_steps=100)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = value


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    """The config file (if any) with the overrides applied, validated."""
    raw: dict = {}
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise ConfigError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected sections (data, model, optim, train, checkpoint, log) at the top")
    for override in overrides:
        apply_override(raw, override)
    apply_preset(raw)
    cfg = from_dict(Config, raw)
    cfg.validate()
    return cfg


def config_from_dict(values: dict) -> Config:
    """A Config saved by `to_dict` (in a checkpoint), rebuilt."""
    return from_dict(Config, values)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}: a config's keys as overrides name them; lists
    and empty sections are values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
