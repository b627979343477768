"""Config: YAML + overrides into typed dataclasses; every mistake is one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from restorer.formats.config import Config, ConfigError, DataConfig, config_from_dict, dump_config, load_config
from restorer.data.jpeg import JpegSpec
from restorer.data.patches import PatchSpec

REPO = Path(__file__).resolve().parent.parent


def test_seed_yaml_is_the_seed_exactly():
    cfg = load_config(str(REPO / "configs" / "seed.yaml"))
    assert (cfg.train.batch_size, cfg.data.workers, cfg.optim.lr, cfg.train.epochs) == (8, 4, 5e-4, 100)
    assert (cfg.data.patch.size, cfg.data.jpeg.quality, cfg.data.jpeg.chroma, cfg.data.jpeg.double_p) == (128, (10, 10), "420", 0)
    assert cfg.data.val_qualities == (10,) and cfg.model.seed.conditioning == "none"  # the document's network
    assert (cfg.optim.name, cfg.optim.last_lr_scale, cfg.optim.loss, cfg.optim.schedule) == ("adam", 0.5, "mse_sum", "constant")
    assert (cfg.data.patch.rescale_p, cfg.data.patch.scales) == (0.5, (0.9, 0.8, 0.7, 0.6))
    assert (cfg.data.patch.rotate_p, cfg.data.patch.rotations, cfg.data.patch.flip_p) == (0.5, (90, 180, 270), 0.0)
    assert cfg.data.patches_per_image == 1 and cfg.model.name == "seed" and cfg.model.seed.residual is False and cfg.train.precision == "fp32"


@pytest.mark.parametrize("name", ["seed", "gpu", "cpu"])
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    cfg = load_config(str(REPO / "configs" / f"{name}.yaml"))
    assert config_from_dict(cfg.to_dict()) == cfg
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg))
    assert load_config(str(saved)) == cfg


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(None, ["data.shards=/x", "train.max_steps=100", "optim.lr=1e-3", "train.compile=true",
                             "data.jpeg.quality=[10, 60]", "train.out_dir=runs/a b"])
    assert cfg.data.shards == "/x" and cfg.train.max_steps == 100 and cfg.optim.lr == 1e-3
    assert cfg.train.compile is True and cfg.data.jpeg.quality == (10, 60) and cfg.train.out_dir == "runs/a b"


@pytest.mark.parametrize("overrides, message", [
    (["train.max_step=5"], "unknown key train.max_step; valid keys in train: out_dir, epochs, max_steps"),
    (["trian.epochs=5"], "unknown key trian; valid keys: data, model, optim, train, checkpoint, log"),
    (["train.batch_size=eight"], "train.batch_size: expected an integer, got 'eight'"),
    (["train.batch_size=0"], "train.batch_size: must be >= 1, got 0"),
    (["optim.lr=-1"], "optim.lr: must be > 0"),
    (["train.precision=fp8"], "train.precision: must be one of fp32, bf16, fp16, got 'fp8'"),
    (["data.jpeg.chroma=411"], "data.jpeg.chroma: must be one of 444, 422, 420, random, got '411'"),
    (["model.name=unet", "model.unet.conditioning=film"], "model.unet.conditioning: must be one of none, input, decoder, scales, got 'film'"),
    (["data.jpeg.quality=[60, 10]"], "data.jpeg.quality: must be 2 or more qualities in 1..100, ascending"),
    (["data.jpeg.quality=[10]"], "data.jpeg.quality: must be 2 or more qualities"),
    (["data.jpeg.quality_weights=[1, 2]"], "data.jpeg.quality_weights: must be one weight >= 0 per interval"),
    (["data.patch.quality=[10, 60]"], "unknown key data.patch.quality; valid keys in data.patch: size"),
    (["model.name=unet2"], "model.name: must be one of dncnn, nafnet, seed, unet, got 'unet2'"),
    (["train.compile=yes please"], "train.compile: expected true or false"),
    (["train.epochs"], "is not key=value"),
])
def test_mistakes_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.shards=/x", *overrides])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected sections"):
        load_config(str(bad))


def test_defaults_need_only_shards():
    cfg = load_config(None, ["data.shards=/x"])
    assert cfg == Config(data=DataConfig(shards="/x"))  # every section at its defaults, but the shards
    assert cfg.data.jpeg == JpegSpec() and cfg.data.patch == PatchSpec() and cfg.model.name == "seed"
    with pytest.raises(ConfigError, match="data.shards: must be a shard folder"):
        load_config(None, [])


# every numeric setting of ours with its bound, one out-of-range value each: NaN and the infinities
# never pass (lr=inf used to train to a PSNR of nan and exit 0); seed -1 and betas [2, -1] were tracebacks
@pytest.mark.parametrize("override, message", [
    ("data.epoch_samples=-1", "data.epoch_samples: must be >= 0, got -1"),
    ("data.patches_per_image=0", "data.patches_per_image: must be >= 1, got 0"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer: must be >= 1, got 0"),
    ("data.workers=-1", "data.workers: must be >= 0, got -1"),
    ("data.val_crop=8", "data.val_crop: must be >= 16"),
    ("data.val_qualities=[101]", "data.val_qualities: must be one or more qualities in 1..100, got [101]"),
    ("data.patch.rescale_p=.nan", "data.patch.rescale_p: must be a finite number, got nan"),
    ("data.jpeg.quality_weights=[.inf]", "data.jpeg.quality_weights[0]: must be a finite number, got inf"),
    ("optim.lr=inf", "optim.lr: must be a finite number, got 'inf'"),
    ("optim.lr=nan", "optim.lr: must be a finite number, got 'nan'"),
    ("optim.lr=1e400", "optim.lr: must be a finite number, got '1e400'"),
    ("optim.lr=1" + "0" * 400, "optim.lr: must be a finite number, got 1000"),
    ("optim.lr=0", "optim.lr: must be > 0, got 0.0"),
    ("optim.last_lr_scale=-1", "optim.last_lr_scale: must be >= 0, got -1.0"),
    ("optim.betas=[2,-1]", "optim.betas: must be two numbers in [0, 1), got [2.0, -1.0]"),
    ("optim.betas=[0.9, .inf]", "optim.betas[1]: must be a finite number, got inf"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: must be >= 0, got -0.1"),
    ("optim.charbonnier_eps=0", "optim.charbonnier_eps: must be > 0, got 0.0"),
    ("optim.grad_clip=.nan", "optim.grad_clip: must be a finite number, got nan"),
    ("optim.grad_clip=-1", "optim.grad_clip: must be >= 0, got -1.0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps: must be >= 0, got -1"),
    ("optim.min_lr_scale=1.5", "optim.min_lr_scale: must be in [0, 1], got 1.5"),
    ("optim.step_every=-1", "optim.step_every: must be >= 0, got -1"),
    ("optim.step_gamma=0", "optim.step_gamma: must be in (0, 1], got 0.0"),
    ("optim.ema=1", "optim.ema: must be in [0, 1), got 1.0"),
    ("train.epochs=0", "train.epochs: must be >= 1, got 0"),
    ("train.max_steps=-1", "train.max_steps: must be >= 0, got -1"),
    ("train.max_minutes=-1", "train.max_minutes: must be >= 0, got -1.0"),
    ("train.max_minutes=.inf", "train.max_minutes: must be a finite number, got inf"),
    ("train.grad_accum=0", "train.grad_accum: must be >= 1, got 0"),
    ("train.seed=-1", "train.seed: must be in [0, 4294967295], got -1"),
    ("train.seed=4294967296", "train.seed: must be in [0, 4294967295], got 4294967296"),
    ("train.max_nonfinite=0", "train.max_nonfinite: must be >= 1, got 0"),
    ("train.stop_grace_s=inf", "train.stop_grace_s: must be a finite number, got 'inf'"),
    ("train.stop_grace_s=0", "train.stop_grace_s: must be in (0, 31536000], got 0.0"),
    ("train.collective_timeout_s=1e12", "train.collective_timeout_s: must be in (0, 31536000], got 1000000000000.0"),
    ("checkpoint.every=0", "checkpoint.every: must be >= 1, got 0"),
    ("checkpoint.keep=-1", "checkpoint.keep: must be >= 0, got -1"),
    ("log.every=0", "log.every: must be >= 1, got 0"),
    ("log.val_every=-1", "log.val_every: must be >= 0, got -1"),
    ("log.pictures=-1", "log.pictures: must be >= 0, got -1"),
])
def test_numbers_out_of_range_name_the_key_and_the_bound(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.shards=/x", override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_numbers_at_their_bounds_pass():
    cfg = load_config(None, ["data.shards=/x", "train.seed=4294967295", "optim.betas=[0, 0.999]", "optim.ema=0",
                             "optim.min_lr_scale=1", "optim.step_gamma=1", "train.stop_grace_s=31536000",
                             "data.epoch_samples=0", "data.workers=0", "optim.grad_clip=0"])
    assert cfg.train.seed == 2**32 - 1 and cfg.optim.betas == (0.0, 0.999)


@pytest.mark.parametrize("override, shown", [("optim.lr=inf", "optim.lr: must be a finite number, got 'inf'"),
                                             ("train.seed=-1", "train.seed: must be in [0, 4294967295], got -1")])
def test_the_trainer_says_a_number_out_of_range_in_one_line(tmp_path, override, shown):
    """launch/train.py's main: the line and exit 2, before any work (the run folder is never made)."""
    from helpers import cli_here
    from restorer.train.loop import main

    p = cli_here(main, "--config", REPO / "configs" / "cpu.yaml", f"train.out_dir={tmp_path / 'run'}", override)
    assert (p.returncode, p.stderr) == (2, f"restorer train: error: {shown}\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("data.train_urls={p,p}ipe:touch M", "data.train_urls: 'pipe:touch M': a pipe: URL runs a shell command on every "
                                         "rank and worker: set data.allow_pipe=true if you mean it"),
    ("data.val_urls=v.tar::Pipe:touch M", "data.val_urls: 'Pipe:touch M': a pipe: URL runs a shell command"),
    ("data.val_urls='v-{0..1}.tar:: PIPE:touch M'", "data.val_urls: ' PIPE:touch M': a pipe: URL runs"),
    ("data.val_urls=s3://bucket/val.tar", "data.val_urls: 's3://bucket/val.tar': 's3:' is not a scheme the pipeline "
                                          "reads: plain paths, file:, http:, https: (and pipe: with data.allow_pipe=true)"),
    ("data.val_urls=ftp://me:pw@host/val.tar", "data.val_urls: 'ftp://me:***@host/val.tar': 'ftp:' is not a scheme"),
    ("data.val_urls=HTTP://host/val.tar", "data.val_urls: 'HTTP://host/val.tar': 'HTTP:' is not a scheme the pipeline "
                                          "reads"),
    ("data.val_urls=val-{0..1.tar", "data.val_urls: Unbalanced braces: 'val-{0..1.tar'"),
])
def test_urls_are_checked_after_expansion_and_in_any_case(override, message):
    """As webdataset expands them ('::', braces) and as its gopen reads their scheme (lower-cased)."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.shards=/x", override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value) and ":pw@" not in str(e.value)
    with pytest.raises(ConfigError, match="is not a scheme the pipeline reads"):
        load_config(None, ["data.shards=/x", "data.allow_pipe=true", "data.val_urls=Pipe:touch M"])


def test_urls_the_pipeline_reads_pass():
    urls = "/d/t-{0..1}.tar::rel/t.tar::file:///d/t.tar::http://h/t.tar::https://u:pw@h/t-{a,b}.tar"
    assert load_config(None, ["data.shards=/x", f"data.train_urls={urls}"]).data.train_urls == urls
    assert load_config(None, ["data.shards=/x", "data.allow_pipe=true", "data.val_urls=pipe:cat v-{0..1}.tar"])


def test_config_yaml_masks_the_passwords_in_urls(tmp_path):
    cfg = load_config(None, ["data.shards=/x", "data.train_urls=https://user:s3cret@h/t-{0..1}.tar"])
    text = dump_config(cfg)
    assert "train_urls: https://user:***@h/t-{0..1}.tar" in text and "s3cret" not in text
    assert cfg.data.train_urls == "https://user:s3cret@h/t-{0..1}.tar"  # the config itself keeps it: the run reads it


def test_config_errors_mask_the_passwords_they_quote():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.shards=/x", "data.train_urls=[https://user:s3cret@h/t.tar]"])
    assert str(e.value) == "data.train_urls: expected a string, got ['https://user:***@h/t.tar']"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["https://user:s3cret@h/t.tar"])
    assert "s3cret" not in str(e.value) and "https://user:***@h/t.tar" in str(e.value)
