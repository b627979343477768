"""Config: YAML + overrides into typed dataclasses; every mistake is one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from restorer.config import Config, ConfigError, DataConfig, config_from_dict, dump_config, load_config
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
