"""The networks that ship (restorer/weights/, restorer.infer.shipped): `restore photo.jpg` works with no
training and no --ckpt, --model names them, train.init_from= fine-tunes from them, and the default
one never makes a JPEG worse on a photo it never saw (scikit-image's astronaut) at any quality."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from helpers import cli_here, require
from restorer.data import jpeg
from restorer.formats.config import ConfigError, load_config
from restorer.infer.inference import load_network, restore_image
from restorer.infer.shipped import DEFAULT_MODEL, SHIPPED, shipped_path
from restorer.tools.evaluate import main as evaluate_main
from restorer.tools.restore import main as restore_main
from restorer.train.checks import init_weights


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    photo = require("skimage.data", "demo").astronaut()  # never trained on
    return np.ascontiguousarray(photo[96:352, 160:416])  # 256 x 256: the face and the suit


def test_every_shipped_network_is_there_with_its_card_and_loads():
    assert DEFAULT_MODEL in SHIPPED
    for name in SHIPPED:
        path = shipped_path(name)
        card = json.loads(path.with_suffix(".json").read_text())
        net = load_network(path, "cpu")
        assert net.card == card and card["name"] == name and net.takes_quality
        assert path.stat().st_size < 20e6  # a few MB in the repository
        assert {"photos", "recipe", "field"} <= card.keys()


def test_restore_without_ckpt_uses_the_shipped_network_and_writes_to_restored(astronaut, tmp_path, monkeypatch):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg.encode(astronaut, 10))
    monkeypatch.chdir(tmp_path)
    p = cli_here(restore_main, photo)
    assert p.returncode == 0, p.stderr
    restored = np.asarray(Image.open(tmp_path / "restored" / "photo.png"))
    before = jpeg.decode(photo.read_bytes())[0]
    assert psnr(restored, astronaut) > psnr(before, astronaut) + 1.0  # it restores, it does not copy
    for flag in ("--model", "--ckpt"):  # by name either way, as train.init_from takes it
        p2 = cli_here(restore_main, flag, DEFAULT_MODEL, photo, "--out", tmp_path / flag.strip("-"))
        assert p2.returncode == 0, p2.stderr
        assert np.array_equal(np.asarray(Image.open(tmp_path / flag.strip("-") / "photo.png")), restored)


def test_the_flags_say_their_mistakes_in_one_line(tmp_path):
    p = cli_here(restore_main, "--model", "no-such-net", tmp_path)
    assert p.returncode == 2 and "invalid choice: 'no-such-net'" in p.stderr and DEFAULT_MODEL in p.stderr
    p = cli_here(restore_main, "--model", DEFAULT_MODEL, "--ckpt", tmp_path / "x.pt", tmp_path)
    assert p.returncode == 2 and "not allowed with argument" in p.stderr
    p = cli_here(evaluate_main, "--model", "no-such-net", "--images", tmp_path)
    assert p.returncode == 2 and "invalid choice" in p.stderr
    p = cli_here(restore_main, "--ckpt", "", tmp_path)  # an unset $CKPT is no request for the shipped network
    assert p.returncode == 2 and "--ckpt is empty" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_the_default_network_never_makes_a_jpeg_worse_at_any_quality(astronaut):
    net = load_network(shipped_path(DEFAULT_MODEL), "cpu")
    gains = {}
    for q in (10, 20, 30, 40, 50, 60, 70, 80, 90, 95):
        for chroma in ("420", "444"):
            data = jpeg.encode(astronaut, q, chroma)
            before, quality = jpeg.decode(data)
            after = restore_image(net, before, quality=quality)
            gains[q, chroma] = psnr(after, astronaut) - psnr(before, astronaut)
    assert min(gains.values()) >= 0.0, gains
    assert gains[10, "420"] > 1.0, gains
    gray = np.asarray(Image.fromarray(astronaut).convert("L"))  # a grayscale file: its plane in all three
    before, quality = jpeg.decode(jpeg.encode(gray, 10))
    before = before[..., 0]
    assert psnr(restore_image(net, before, quality=quality), gray) > psnr(before, gray) + 1.0


def test_train_init_from_takes_a_shipped_name_and_says_what_the_config_must_be():
    cfg = load_config("configs/ship.yaml", [f"train.init_from={DEFAULT_MODEL}"])
    weights = init_weights(cfg)
    net = load_network(shipped_path(DEFAULT_MODEL), "cpu")
    assert all(np.array_equal(weights[k].numpy(), v.numpy()) for k, v in net.module.state_dict().items())
    with pytest.raises(ConfigError, match=f"train.init_from: {DEFAULT_MODEL} holds unet .*widths=.16, 32, 64, 128, 256"):
        init_weights(load_config("configs/cpu.yaml", [f"train.init_from={DEFAULT_MODEL}"]))


def test_the_card_says_the_recipe_configs_ship_yaml_holds():
    """configs/ship.yaml is the default network's recipe: each stage's command on the card, run on it, trains
    that stage's batch, and the last one's JPEGs, patch size and photo_side are the card's."""
    card = json.loads(shipped_path(DEFAULT_MODEL).with_suffix(".json").read_text())
    for stage in card["recipe"]["stages"]:
        words = stage["command"].split()
        assert words[words.index("--config") + 1] == card["recipe"]["config"] == "configs/ship.yaml"
        cfg = load_config(card["recipe"]["config"], [w for w in words if "=" in w])
        side = cfg.data.patch.size
        assert stage["batch"] == f"{cfg.train.batch_size} patches of {side} x {side} a step"
    training = card["training"]
    assert {k: training[k] for k in cfg.data.jpeg.card()} == cfg.data.jpeg.card()
    assert (training["patch_size"], training["photo_side"]) == (cfg.data.patch.size, cfg.data.patch.photo_side)
