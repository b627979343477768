"""restorer.tools.export: ONNX (dynamic sizes, checked with onnxruntime), TorchScript and safetensors with
a card, for every network; restore and evaluate take the exported files."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import cli_here, encode, photo_like, require, save_network, write
from restorer.data import jpeg
from restorer.tools.export import main as export_main
from restorer.infer.inference import load_network, restore_array
from restorer.tools.restore import main as restore_main
from restorer.models import build_model

for _module in ("onnx", "onnxscript", "onnxruntime"):
    require(_module, "export")

TINY = {"seed": {"residual": True}, "dncnn": {"depth": 4, "channels": 8},
        "unet": {"widths": [4, 8, 8, 16], "blocks": 1},
        "nafnet": {"width": 4, "enc_blocks": [1, 1], "middle_blocks": 1, "dec_blocks": [1, 1]}}


def _checkpoint(path, name: str, channels: int = 3, conditioning: str = "none"):
    torch.manual_seed(0)
    options = {**TINY[name], **({"conditioning": conditioning} if conditioning != "none" else {})}
    model = build_model(name, in_channels=channels, **options)
    with torch.no_grad():  # not the identity it starts as
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.dim() == 2 else 0.02))  # (the quality's layers: more)
    config = {"data": {"patch": {"grayscale": channels == 1, "size": 64, "photo_side": 512},
                       "jpeg": {"quality": [10, 60, 95], "quality_weights": [0.75, 0.25], "chroma": "random"},
                       "val_qualities": [10, 50]}}
    save_network(path, model, name, options, channels=channels, grayscale=channels == 1, config=config, step=7,
                 best_psnr=29.5)
    return path, model.eval()


def _export(*args) -> subprocess.CompletedProcess:
    return cli_here(export_main, *args)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["seed", "dncnn"])  # (the U-Nets: conditioned, below)
def test_onnx_has_dynamic_sizes_and_matches_pytorch(tmp_path, name):
    import onnxruntime as ort

    ckpt, model = _checkpoint(tmp_path / "net.pt", name)
    p = _export("--ckpt", ckpt, "--format", "onnx", "--out", tmp_path / "net.onnx")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "checked against PyTorch on odd sizes" in p.stdout
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    card = json.loads(session.get_modelmeta().custom_metadata_map["restorer"])
    assert card["network"] == name and card["in_channels"] == 3 and card["training"]["qualities"] == [10, 95]
    assert card["validation"]["best_psnr_db"] == 29.5 and card["options"] == TINY[name]
    for shape in ((1, 3, 45, 67), (2, 3, 9, 130)):  # sizes the export never saw
        x = torch.rand(*shape)
        out = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            assert np.abs(np.clip(out, 0, 1) - model(x).clamp(0, 1).numpy()).max() <= 1 / 255


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet", "nafnet"])
def test_torchscript_runs_without_the_python_classes(tmp_path, name):
    ckpt, model = _checkpoint(tmp_path / "net.pt", name)
    p = _export("--ckpt", ckpt, "--format", "torchscript", "--out", tmp_path / "net.ts")
    assert p.returncode == 0, p.stderr[-3000:]
    files = {"restorer.json": ""}
    loaded = torch.jit.load(str(tmp_path / "net.ts"), _extra_files=files)
    assert json.loads(files["restorer.json"])["network"] == name
    x = torch.rand(1, 3, 33, 47)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


@pytest.mark.slow
def test_safetensors_with_a_card_and_restore_takes_it(tmp_path):
    from safetensors import safe_open

    ckpt, model = _checkpoint(tmp_path / "net.pt", "unet")
    p = _export("--ckpt", ckpt, "--format", "safetensors", "--out", tmp_path / "net.safetensors")
    assert p.returncode == 0, p.stderr[-3000:]
    with safe_open(str(tmp_path / "net.safetensors"), framework="pt") as f:
        card = json.loads(f.metadata()["restorer"])
        assert set(f.keys()) == set(model.state_dict())
    assert card == json.loads((tmp_path / "net.json").read_text()) and card["network"] == "unet"
    assert (card["training"]["patch_size"], card["training"]["photo_side"], card["training"]["steps"]) == (64, 512, 7)
    image = photo_like(70, 50, 3)
    reference = restore_array(load_network(ckpt, "cpu"), image, tile=32, overlap=8)
    got = restore_array(load_network(tmp_path / "net.safetensors", "cpu"), image, tile=32, overlap=8)
    assert np.abs(got.astype(int) - reference).max() <= 1
    src = write(tmp_path / "in" / "photo.jpg", encode(image, "JPEG", quality=20))
    p = cli_here(restore_main, "--ckpt", tmp_path / "net.safetensors", src, "--out", tmp_path / "out")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "out" / "photo.png").exists()


@pytest.mark.slow
def test_export_mistakes_are_one_line(tmp_path):
    ckpt, _ = _checkpoint(tmp_path / "net.pt", "dncnn")
    for args in (["--ckpt", tmp_path / "missing.pt", "--format", "onnx", "--out", tmp_path / "x.onnx"],
                 ["--ckpt", ckpt, "--format", "tflite", "--out", tmp_path / "x"],
                 ["--ckpt", ckpt, "--format", "onnx", "--out", tmp_path]):
        p = _export(*args)
        assert p.returncode == 2 and p.stderr.startswith("restorer export: error: ") and p.stderr.count("\n") == 1, p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet", "nafnet"])
def test_a_conditioned_network_exports_with_its_quality_input_in_every_format(tmp_path, name):
    import onnxruntime as ort
    from safetensors import safe_open

    ckpt, model = _checkpoint(tmp_path / "net.pt", name, conditioning="decoder")
    for fmt, out in (("onnx", "net.onnx"), ("torchscript", "net.ts"), ("safetensors", "net.safetensors")):
        p = _export("--ckpt", ckpt, "--format", fmt, "--out", tmp_path / out)
        assert p.returncode == 0, p.stderr[-3000:]
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input", "quality"]
    card = json.loads(session.get_modelmeta().custom_metadata_map["restorer"])
    assert card["conditioning"] == "decoder" and "IJG quality" in card["quality_input"]
    x, q = torch.rand(2, 3, 41, 29), torch.tensor([15.0, 85.0])
    with torch.no_grad():
        ref = model(x, q).clamp(0, 1)
        assert (model(x, q.flip(0)) - model(x, q)).abs().max() > 1e-3  # the quality matters
        got = session.run(None, {"input": x.numpy(), "quality": q.numpy()})[0]
        assert np.abs(np.clip(got, 0, 1) - ref.numpy()).max() <= 1 / 255
        scripted = torch.jit.load(str(tmp_path / "net.ts"))
        assert torch.allclose(scripted(x, q).clamp(0, 1), ref, atol=1e-5)
    with safe_open(str(tmp_path / "net.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["restorer"])["options"]["conditioning"] == "decoder"
    # restore reads a file's tables for an .onnx network as for a checkpoint, in tiles of any size
    image = photo_like(72, 56, 5)
    src = write(tmp_path / "in" / "photo.jpg", encode(image, "JPEG", quality=35))
    pixels = np.asarray(Image.open(src))
    expected = restore_array(load_network(ckpt, "cpu"), pixels, tile=32, overlap=8, quality=35,
                             bounds=jpeg.file_bounds(src.read_bytes()))  # restore keeps the file's bins, whatever the format
    for out in ("net.onnx", "net.safetensors", "net.pt"):
        target = tmp_path / out.replace(".", "_")
        p = cli_here(restore_main, "--ckpt", tmp_path / out, src, "--out", target, "--tile", "32", "--overlap", "8")
        assert p.returncode == 0 and "restored 1, unchanged 0" in p.stdout, p.stderr[-3000:]
        got = np.asarray(Image.open(target / "photo.png"))
        assert np.abs(got.astype(int) - expected).max() <= 1, out


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_export_that_does_not_match_pytorch_is_not_written(tmp_path, monkeypatch, fmt):
    """Each compiled format is run against PyTorch before it is kept (safetensors holds the weights
    themselves): with a tolerance no difference can meet, the check fails, the export exits 1 and no
    file is left."""
    import restorer.tools.export

    ckpt, _ = _checkpoint(tmp_path / "net.pt", "dncnn")
    monkeypatch.setattr(restorer.tools.export, "TOLERANCE", -1.0)
    out = tmp_path / "out" / f"net.{fmt}"
    p = _export("--ckpt", ckpt, "--format", fmt, "--out", out)
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stderr.count("\n") == 1 and "differs from PyTorch" in p.stderr and "not written" in p.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
