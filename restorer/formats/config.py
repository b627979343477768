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

A choice is a `Literal[...]` field, checked by restorer.base.choices.check_choices. A new key: a field
in its section's dataclass here (or in the network's or spec's own, which this file imports)."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from restorer.base.choices import Literal, check_choices
from restorer.base.device import DEVICES, TRAIN_PRECISIONS
from restorer.data.jpeg import JpegSpec
from restorer.data.patches import PatchSpec
from restorer.base.errors import RestorerError
from restorer.models import MODELS, DnCNNOptions, NAFNetOptions, NetworkSpec, SeedOptions, UNetOptions
from restorer.base.urls import mask_secrets, shard_url_problem


class ConfigError(RestorerError):
    """A bad config file, key or value; the message is one line, the passwords of the URLs it quotes masked."""

    def __str__(self) -> str:
        return mask_secrets(super().__str__())


LONGEST_WAIT_S = 365 * 24 * 3600  # a year: a longer timeout is a mistake (threading and timedelta refuse far longer)


def check_range(key: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False) -> None:
    """ValueError "key: must be ..., got value" unless low <= value <= high (< or > where open, no
    bound where None). NaN and the infinities never pass: every numeric setting is finite."""
    finite = not isinstance(value, float) or math.isfinite(value)
    if finite and (low is None or (value > low if low_open else value >= low)) \
            and (high is None or (value < high if high_open else value <= high)):
        return
    if low is not None and high is not None:
        want = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    else:
        want = f"{'>' if low_open else '>='} {low}" if low is not None else f"{'<' if high_open else '<='} {high}"
    raise ValueError(f"{key}: must be {'' if finite else 'a finite number '}{want}, got {value}")


def expand_shard_urls(pattern: str, allow_pipe: bool) -> list[str]:
    """The URLs a data.train_urls / val_urls pattern names, expanded by webdataset's own expand_urls
    (what the pipeline opens: '::' between patterns, ${VAR} from WDS_VAR, brace ranges), each
    checked by check_shard_urls. ValueError (one line) otherwise."""
    from webdataset.shardlists import expand_urls  # (imported when a pattern is given: it is slow to import)

    try:
        urls = list(expand_urls(pattern))
    except ValueError as e:  # braceexpand's UnbalancedBracesError
        raise ValueError(mask_secrets(str(e))) from None
    check_shard_urls(urls, allow_pipe)
    return urls


def check_shard_urls(urls: list[str], allow_pipe: bool) -> None:
    """ValueError naming the first URL the pipeline must not open (restorer.base.urls.shard_url_problem)."""
    for url in urls:
        problem = shard_url_problem(url, allow_pipe)
        if problem:
            raise ValueError(problem)


def bookkeeping(default: Any) -> Any:
    """A field that says where or how a run is kept, shown or stopped, not what it trains: a change of
    it on resume is no change of the run, and runs never differ by it (bookkeeping_keys)."""
    return field(default=default, metadata={"bookkeeping": True})


@dataclass
class DataConfig:
    """Where the training pairs come from and how they are made (restorer.train.loader)."""

    shards: str = ""  # a shard folder or its manifest.json
    train_urls: str = ""  # instead of the manifest's list: a URL pattern as webdataset expands them (brace
    val_urls: str = ""  # ranges, '::') of paths, file:, http(s):// or pipe:aws s3 cp s3://... - (allow_pipe)
    epoch_samples: int = 0  # patches per epoch; 0: every training image once, patches_per_image each
    patch: PatchSpec = field(default_factory=PatchSpec)  # the clean patches: size, rescale, rotation, colour
    jpeg: JpegSpec = field(default_factory=JpegSpec)  # their JPEG: qualities, chroma, double JPEG
    patches_per_image: int = 256  # patches cut from each decoded image: a decode costs ~100 patches
    shuffle_buffer: int = 2048  # patches mixed: a slot's window of shuffle_buffer // patches_per_image images
    workers: int = 4  # DataLoader worker processes per rank
    val_crop: int = 256  # validation: centre crop of at most this side ...
    val_qualities: tuple[int, ...] = (10,)  # ... JPEG-encoded at each of these qualities (jpeg.chroma's subsampling)
    verify: bool = False  # at start, check every shard's sha256 against the manifest (sizes are always checked)
    allow_pipe: bool = False  # let train_urls/val_urls use pipe: (it runs a shell command on every rank and worker)
    trace: bool = False  # write RUN/trace.jsonl: the image and patch of every slot of every step (from shards only)

    def validate(self) -> None:
        """Raise ValueError naming the field that is wrong."""
        if not (self.shards or self.train_urls):
            raise ValueError("shards: must be a shard folder (or its manifest.json), or set train_urls")
        check_range("epoch_samples", self.epoch_samples, 0)
        if self.train_urls and not self.shards and self.epoch_samples <= 0:
            raise ValueError(f"epoch_samples: must be > 0 when train_urls is used without a manifest, got {self.epoch_samples}")
        for name in ("patches_per_image", "shuffle_buffer"):
            check_range(name, getattr(self, name), 1)
        check_range("workers", self.workers, 0)
        if self.trace and self.train_urls:
            raise ValueError("trace: the stream from train_urls is not a function of integers; trace a run from a "
                             "shard folder (data.shards)")
        if self.val_crop < 16:  # whole 8x8 blocks, at least SSIM's 11x11 window
            raise ValueError(f"val_crop: must be >= 16 (SSIM's window is 11x11), got {self.val_crop}")
        for name in ("train_urls", "val_urls"):  # each URL as the pipeline will open it: after expansion
            pattern = getattr(self, name)
            try:
                if pattern:
                    expand_shard_urls(pattern, self.allow_pipe)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
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
        check_range("lr", self.lr, 0, low_open=True)
        for key in ("last_lr_scale", "weight_decay", "grad_clip", "warmup_steps", "step_every"):
            check_range(key, getattr(self, key), 0)
        if len(self.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):  # else Adam's traceback
            raise ValueError(f"betas: must be two numbers in [0, 1), got {list(self.betas)}")
        check_range("charbonnier_eps", self.charbonnier_eps, 0, low_open=True)  # 0: sqrt's gradient at 0 is NaN
        check_range("min_lr_scale", self.min_lr_scale, 0, 1)
        if self.schedule == "step" and self.step_every <= 0:
            raise ValueError(f"step_every: must be > 0 for the step schedule, got {self.step_every}")
        check_range("step_gamma", self.step_gamma, 0, 1, low_open=True)
        check_range("ema", self.ema, 0, 1, high_open=True)


@dataclass
class TrainConfig:
    out_dir: str = bookkeeping("runs/default")  # the run directory: config.yaml, metrics.jsonl, last.pt, best.pt
    epochs: int = 100
    max_steps: int = 0  # stop after this many optimizer steps; > 0 takes precedence over epochs
    max_minutes: float = 0.0  # also stop after this much training time (resumes add up); the lr schedule
    #                           then runs by the time spent or the steps done, whichever is further on
    batch_size: int = 8  # per rank and per micro-step: the global batch is x ranks x grad_accum
    grad_accum: int = 1
    seed: int = 0
    device: Literal[DEVICES] = "auto"  # auto: cuda when available (restorer.base.device)
    precision: Literal[TRAIN_PRECISIONS] = "fp32"  # bf16, fp16: autocast (a GradScaler only for fp16)
    channels_last: bool = False
    compile: bool = False
    resume: bool = bookkeeping(True)  # continue from out_dir/last.pt when it exists; false starts fresh
    init_from: str = ""  # a fresh run starts from these weights: a .pt (its EMA), a .safetensors or a shipped name
    overwrite: bool = bookkeeping(False)  # fresh start over a run recorded in .restorer-run: deletes its files (never others)
    max_nonfinite: int = 20  # this many non-finite losses in a row stop the run
    stop_grace_s: float = bookkeeping(25.0)  # after SIGTERM/SIGUSR1, exit by force if a step never ends
    collective_timeout_s: float = 600.0  # a collective (all-reduce, broadcast) that waits longer fails the run

    def validate(self) -> None:
        check_choices(self)
        for key in ("epochs", "batch_size", "grad_accum", "max_nonfinite"):
            check_range(key, getattr(self, key), 1)
        check_range("max_steps", self.max_steps, 0)
        check_range("max_minutes", self.max_minutes, 0)
        check_range("seed", self.seed, 0, 2**32 - 1)  # numpy's seeds are >= 0 (-1: a traceback); 2**32 are plenty
        for key in ("stop_grace_s", "collective_timeout_s"):
            check_range(key, getattr(self, key), 0, LONGEST_WAIT_S, low_open=True)
        if not self.out_dir:
            raise ValueError("out_dir: must be a folder, got ''")


@dataclass
class CheckpointConfig:
    every: int = 1000  # write last.pt every this many steps (and at the end)
    keep: int = 0  # also keep step-NNNNNNNN.pt copies of the last this many saves; 0: none

    def validate(self) -> None:
        check_range("every", self.every, 1)
        check_range("keep", self.keep, 0)


@dataclass
class LogConfig:
    every: int = 50  # a metrics.jsonl line every this many steps
    val_every: int = 1000  # validate every this many steps (and at the end); 0: only at the end
    progress: bool = bookkeeping(True)  # rank 0's tqdm bar
    tensorboard: bool = bookkeeping(True)  # scalars into out_dir/tb when the tensorboard package is installed
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
        check_range("every", self.every, 1)
        check_range("val_every", self.val_every, 0)
        check_range("pictures", self.pictures, 0)


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
        number = None
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer past float's range
                number = math.inf
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # nan, inf, 1e400: every numeric setting is finite
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
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


def bookkeeping_keys(cls: Optional[type] = None, prefix: str = "") -> frozenset[str]:
    """The flattened keys of the config's bookkeeping fields ("train.resume", ...)."""
    keys = set()
    for f in dataclasses.fields(cls or Config):
        if f.metadata.get("bookkeeping"):
            keys.add(prefix + f.name)
        elif dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys |= bookkeeping_keys(f.default_factory, f"{prefix}{f.name}.")
    return frozenset(keys)


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
    """The config as YAML (the run folder's config.yaml), passwords in its URLs masked: a file to read
    and share, not the secret (the checkpoint keeps the config as given, to resume)."""
    return yaml.safe_dump(mask_secrets(cfg.to_dict()), sort_keys=False)
