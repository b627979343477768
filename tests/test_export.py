"""restorer.export: ONNX (dynamic sizes, checked with onnxruntime), TorchScript and safetensors with
a card, for every network; restore and evaluate take the exported files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO, encode, photo_like, write
from restorer.checkpoint import save_checkpoint
from restorer.inference import load_network, restore_array
from restorer.models import build_model

pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxscript, onnxruntime, safetensors)")
pytest.importorskip("safetensors", reason="the export extra (onnx, onnxscript, onnxruntime, safetensors)")

TINY = {"seed": {"residual": True}, "dncnn": {"depth": 4, "channels": 8},
        "unet": {"widths": [4, 8, 8, 16], "blocks": 1},
        "nafnet": {"width": 4, "enc_blocks": [1, 1], "middle_blocks": 1, "dec_blocks": [1, 1]}}


def _checkpoint(path, name: str, channels: int = 3):
    torch.manual_seed(0)
    model = build_model(name, in_channels=channels, **TINY[name])
    with torch.no_grad():  # not the identity it starts as
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_checkpoint(path, {"model": model.state_dict(), "model_name": name, "step": 7, "best_psnr": 29.5,
                           "model_args": {"in_channels": channels, **TINY[name]},
                           "config": {"data": {"patch": {"grayscale": channels == 1, "quality": [10, 10], "size": 64},
                                               "val_quality": 10}}})
    return path, model.eval()


def _export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "restorer.export", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


@pytest.mark.parametrize("name", ["seed", "dncnn", "unet", "nafnet"])
def test_onnx_has_dynamic_sizes_and_matches_pytorch(tmp_path, name):
    import onnxruntime as ort

    ckpt, model = _checkpoint(tmp_path / "net.pt", name)
    p = _export("--ckpt", ckpt, "--format", "onnx", "--out", tmp_path / "net.onnx")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "checked against PyTorch on odd sizes" in p.stdout
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    card = json.loads(session.get_modelmeta().custom_metadata_map["restorer"])
    assert card["network"] == name and card["in_channels"] == 3 and card["training"]["jpeg_quality"] == [10, 10]
    assert card["validation"]["best_psnr_db"] == 29.5 and card["options"] == TINY[name]
    for shape in ((1, 3, 45, 67), (2, 3, 9, 130)):  # sizes the export never saw
        x = torch.rand(*shape)
        out = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            assert np.abs(np.clip(out, 0, 1) - model(x).clamp(0, 1).numpy()).max() <= 1 / 255


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


def test_safetensors_with_a_card_and_restore_takes_every_format(tmp_path):
    from safetensors import safe_open

    ckpt, model = _checkpoint(tmp_path / "net.pt", "unet")
    for fmt, out in (("safetensors", "net.safetensors"), ("onnx", "net.onnx")):
        p = _export("--ckpt", ckpt, "--format", fmt, "--out", tmp_path / out)
        assert p.returncode == 0, p.stderr[-3000:]
    with safe_open(str(tmp_path / "net.safetensors"), framework="pt") as f:
        card = json.loads(f.metadata()["restorer"])
        assert set(f.keys()) == set(model.state_dict())
    assert card == json.loads((tmp_path / "net.json").read_text()) and card["network"] == "unet"
    image = photo_like(70, 50, 3)
    reference = restore_array(load_network(ckpt, "cpu"), image, tile=32, overlap=8)
    for out in ("net.safetensors", "net.onnx"):
        got = restore_array(load_network(tmp_path / out, "cpu"), image, tile=32, overlap=8)
        assert np.abs(got.astype(int) - reference).max() <= 1, out
    src = write(tmp_path / "in" / "photo.jpg", encode(image, "JPEG", quality=20))
    for out in ("net.onnx", "net.safetensors"):
        p = subprocess.run([sys.executable, "-m", "restorer.restore", "--ckpt", str(tmp_path / out), str(src),
                            "--out", str(tmp_path / out.replace(".", "_"))], capture_output=True, text=True, cwd=REPO)
        assert p.returncode == 0, p.stderr[-3000:]
        assert (tmp_path / out.replace(".", "_") / "photo.png").exists()


def test_export_mistakes_are_one_line(tmp_path):
    ckpt, _ = _checkpoint(tmp_path / "net.pt", "dncnn")
    for args in (["--ckpt", tmp_path / "missing.pt", "--format", "onnx", "--out", tmp_path / "x.onnx"],
                 ["--ckpt", ckpt, "--format", "tflite", "--out", tmp_path / "x"],
                 ["--ckpt", ckpt, "--format", "onnx", "--out", tmp_path]):
        p = _export(*args)
        assert p.returncode == 2 and p.stderr.startswith("export: error: ") and p.stderr.count("\n") == 1, p.stderr
