"""restorer.evaluate: the metrics table, the JSON, the Y-channel option and the error handling."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from restorer.checkpoint import save_checkpoint
from restorer.data.degrade import jpeg_decode, jpeg_encode
from restorer.evaluate import KEYS, evaluate, main
from restorer.models import build_model

from helpers import encode, photo_like, write

ROW = re.compile(r"^(JPEG|model|gain)\s+([-+]?\d+\.\d+)\s+([-+]?\d+\.\d+)\s+([-+]?\d+\.\d+)\s*$")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An identity model: a residual seed network whose output convolution is zero.

    A freshly initialised residual seed is only *nearly* the identity: its output layer (normal,
    std 1e-3) changes pixels by ~0.02 RMS, which costs 0.3-0.4 dB at q10, too much for a 0.05 dB
    check. So the EMA weights (which evaluate must prefer) have `last` zeroed, and the plain
    model weights are the fresh ones: the identity checks below also show the EMA is used.
    """
    torch.manual_seed(0)
    m = build_model("seed", in_channels=3, residual=True)
    fresh = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m.last.weight.zero_()
    path = tmp_path_factory.mktemp("ckpt") / "seed.pt"
    save_checkpoint(path, {
        "model": fresh, "ema": m.state_dict(), "model_name": "seed",
        "model_args": {"in_channels": 3, "residual": True},
        "config": {"data": {"patch": {"grayscale": False}}},
    })
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    # 99x83: not multiples of 8, so the top-left crop to 96x80 is exercised
    write(root / "a.png", encode(photo_like(99, 83, seed=1), "PNG"))
    write(root / "sub" / "b.PNG", encode(photo_like(96, 80, seed=2), "PNG"))
    write(root / "c.bmp", encode(photo_like(80, 96, seed=3), "BMP"))
    write(root / "notes.txt", b"not an image")  # ignored: not an image extension
    return root


def parse_tables(text: str) -> dict[str, dict]:
    """{quality: {"count": n, "JPEG": (psnr, ssim, psnrb), "model": ..., "gain": ...}} from stdout."""
    tables, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^JPEG quality (\d+): (\d+) images?$", line)
        if m:
            current = tables.setdefault(m.group(1), {"count": int(m.group(2))})
            continue
        m = ROW.match(line)
        if m and current is not None:
            current[m.group(1)] = tuple(float(v) for v in m.group(2, 3, 4))
    return tables


def run_main(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_table_and_json_agree(ckpt, images, tmp_path, capsys):
    js = tmp_path / "out" / "res.json"
    js.parent.mkdir()
    rc, out, err = run_main(capsys, "--ckpt", ckpt, "--images", images, "--quality", 10, 30,
                            "--json", js, "--device", "cpu")
    assert rc == 0, err
    assert "RGB" in out
    res = json.loads(js.read_text())
    assert set(res) == {"checkpoint", "channel", "qualities"}
    assert res["channel"] == "rgb" and res["checkpoint"] == str(ckpt)
    assert list(res["qualities"]) == ["10", "30"]
    tables = parse_tables(out)
    assert set(tables) == {"10", "30"}
    for q, block in res["qualities"].items():
        assert set(block) == {"images", "mean"}
        assert set(block["images"]) == {"a.png", "sub/b.PNG", "c.bmp"}
        for vals in block["images"].values():
            assert set(vals) == set(KEYS) == {"psnr_jpeg", "psnr_model", "ssim_jpeg", "ssim_model",
                                              "psnrb_jpeg", "psnrb_model"}
        mean = block["mean"]
        assert set(mean) == set(KEYS)
        for k in KEYS:
            assert mean[k] == pytest.approx(np.mean([v[k] for v in block["images"].values()]), abs=1e-9)
        t = tables[q]
        assert t["count"] == 3
        for row in ("jpeg", "model"):
            printed = t["JPEG" if row == "jpeg" else "model"]
            assert printed[0] == round(mean[f"psnr_{row}"], 3)
            assert printed[1] == round(mean[f"ssim_{row}"], 4)
            assert printed[2] == round(mean[f"psnrb_{row}"], 3)
        gain = t["gain"]
        assert gain[0] == pytest.approx(mean["psnr_model"] - mean["psnr_jpeg"], abs=6e-4)
        assert gain[1] == pytest.approx(mean["ssim_model"] - mean["ssim_jpeg"], abs=6e-5)
        assert gain[2] == pytest.approx(mean["psnrb_model"] - mean["psnrb_jpeg"], abs=6e-4)


def _numpy_psnr(x: np.ndarray, y: np.ndarray) -> float:
    mse = np.mean((x.astype(np.float64) / 255 - y.astype(np.float64) / 255) ** 2)
    return float(10 * np.log10(1.0 / mse))


def test_identity_model_and_independent_jpeg_psnr(ckpt, images):
    res = evaluate(ckpt, images, [10, 40], device="cpu")
    for q in (10, 40):
        block = res["qualities"][str(q)]
        for name, vals in block["images"].items():
            # a fresh residual seed model is (almost) the identity: no gain, no loss
            assert abs(vals["psnr_model"] - vals["psnr_jpeg"]) < 0.05
            assert abs(vals["ssim_model"] - vals["ssim_jpeg"]) < 0.005
            # the JPEG numbers, recomputed independently: encode the top-left 8-aligned crop
            from PIL import Image

            clean = np.asarray(Image.open(images / name).convert("RGB"))
            clean = clean[: clean.shape[0] // 8 * 8, : clean.shape[1] // 8 * 8]
            jpeg = jpeg_decode(jpeg_encode(np.ascontiguousarray(clean), q))
            assert vals["psnr_jpeg"] == pytest.approx(_numpy_psnr(jpeg, clean), abs=1e-3)
        mean = block["mean"]
        assert abs(mean["psnr_model"] - mean["psnr_jpeg"]) < 0.05
    q10, q40 = res["qualities"]["10"], res["qualities"]["40"]
    # lower quality, lower PSNR; the blocking penalty only lowers PSNR-B
    assert q10["mean"]["psnr_jpeg"] < q40["mean"]["psnr_jpeg"]
    for name in q10["images"]:
        assert q10["images"][name]["psnr_jpeg"] < q40["images"][name]["psnr_jpeg"]
        assert q10["images"][name]["psnrb_jpeg"] <= q10["images"][name]["psnr_jpeg"]
    assert q10["mean"]["psnrb_jpeg"] < q10["mean"]["psnr_jpeg"]  # q10 shows real blocking


def test_y_channel(ckpt, images, tmp_path, capsys):
    rgb = evaluate(ckpt, images, [10], device="cpu")
    js = tmp_path / "y.json"
    rc, out, err = run_main(capsys, "--ckpt", ckpt, "--images", images, "--quality", 10,
                            "--y-channel", "--json", js)
    assert rc == 0, err
    assert "metrics on Y" in out and "rgb2ycbcr" in out
    y = json.loads(js.read_text())
    assert y["channel"] == "y"
    for name, vals in y["qualities"]["10"]["images"].items():
        assert vals["psnr_jpeg"] != pytest.approx(rgb["qualities"]["10"]["images"][name]["psnr_jpeg"], abs=1e-3)
        assert abs(vals["psnr_model"] - vals["psnr_jpeg"]) < 0.05
    # independent Y PSNR for one image (MATLAB rgb2ycbcr convention)
    from PIL import Image

    clean = np.asarray(Image.open(images / "a.png").convert("RGB"))[:80, :96]
    jpeg = jpeg_decode(jpeg_encode(np.ascontiguousarray(clean), 10))

    def y_of(a):
        a = a.astype(np.float64) / 255
        return 16 / 255 + (65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255

    mse = np.mean((y_of(jpeg) - y_of(clean)) ** 2)
    assert y["qualities"]["10"]["images"]["a.png"]["psnr_jpeg"] == pytest.approx(10 * np.log10(1 / mse), abs=1e-3)


def test_max_side_crops(ckpt, images):
    res = evaluate(ckpt, images, [20], device="cpu", max_side=48)
    full = evaluate(ckpt, images, [20], device="cpu")
    a = res["qualities"]["20"]["images"]["a.png"]["psnr_jpeg"]
    assert a != pytest.approx(full["qualities"]["20"]["images"]["a.png"]["psnr_jpeg"], abs=1e-6)


def test_unreadable_image_is_skipped(ckpt, images, tmp_path, capsys):
    d = tmp_path / "imgs"
    write(d / "good.png", encode(photo_like(64, 64, seed=5), "PNG"))
    write(d / "bad.jpg", b"\xff\xd8 definitely not a jpeg")
    rc, out, err = run_main(capsys, "--ckpt", ckpt, "--images", d, "--quality", 10)
    assert rc == 0
    assert parse_tables(out)["10"]["count"] == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate: warning:") and "bad.jpg" in lines[0]


@pytest.mark.parametrize("case", ["missing_ckpt", "no_images", "quality_0", "quality_101", "bad_ckpt"])
def test_errors_exit_2_one_line(case, ckpt, images, tmp_path, capsys):
    args = {"ckpt": ckpt, "images": images, "quality": ["10"]}
    if case == "missing_ckpt":
        args["ckpt"] = tmp_path / "nope.pt"
    elif case == "no_images":
        (tmp_path / "empty").mkdir()
        write(tmp_path / "empty" / "readme.txt", b"x")
        args["images"] = tmp_path / "empty"
    elif case == "quality_0":
        args["quality"] = ["0"]
    elif case == "quality_101":
        args["quality"] = ["10", "101"]
    elif case == "bad_ckpt":
        args["ckpt"] = write(tmp_path / "bad.pt", b"garbage")
    rc, out, err = run_main(capsys, "--ckpt", args["ckpt"], "--images", args["images"], "--quality", *args["quality"])
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate: error: "), err
    assert "Traceback" not in err


def test_cli_module_entry_point(ckpt, images):
    import subprocess
    import sys

    from helpers import REPO

    r = subprocess.run([sys.executable, "-m", "restorer.evaluate", "--ckpt", str(ckpt), "--images", str(images),
                        "--quality", "101"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["evaluate: error: quality must be in 1..100, got 101"]


def test_ema_preferred_and_grayscale_model(ckpt, images, tmp_path, capsys):
    from restorer.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt)
    no_ema = {k: v for k, v in state.items() if k != "ema"}
    save_checkpoint(tmp_path / "noema.pt", no_ema)
    a = evaluate(ckpt, images, [10], device="cpu")["qualities"]["10"]["mean"]
    b = evaluate(tmp_path / "noema.pt", images, [10], device="cpu")["qualities"]["10"]["mean"]
    assert a["psnr_jpeg"] == b["psnr_jpeg"]
    assert abs(b["psnr_model"] - a["psnr_model"]) > 0.05  # the fresh (non-EMA) weights differ

    g = build_model("seed", in_channels=1, residual=True)
    save_checkpoint(tmp_path / "gray.pt", {
        "model": g.state_dict(), "model_name": "seed", "model_args": {"in_channels": 1, "residual": True},
        "config": {"data": {"patch": {"grayscale": True}}},
    })
    rc, out, err = run_main(capsys, "--ckpt", tmp_path / "gray.pt", "--images", images, "--quality", 10)
    assert rc == 0, err
    assert "metrics on Y" in out and "grayscale" in out
    assert parse_tables(out)["10"]["count"] == 3
