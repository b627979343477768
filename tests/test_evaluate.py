"""restorer.tools.evaluate: the papers' protocol (full images, qualities 10-40, RGB and the grayscale Y
benchmarks), independent checks of the JPEG-input figures (numpy, OpenCV), scoring existing JPEG
files, the table, the JSON, the plots and the error convention."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, encode, load_state, photo_like, require, save_network, save_state, write
from restorer.data import jpeg
from restorer.base.colour import matlab_y_u8
from restorer.tools.evaluate import KEYS, SWEEP, Protocol, Runtime, double_shift, evaluate, main
from restorer.infer.inference import load_network, restore_array
from restorer.models import build_model

CPU = Runtime(device="cpu")

ROW = re.compile(r"^\s*(\d+|given)\s+(\d+) \|\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+) \|\s+(\S+)\s+(\S+)\s+(\S+) \|"
                 r"\s+(\S+)\s+(\S+)\s+(\S+)$")


def jpeg_encode(pixels: np.ndarray, quality: int) -> bytes:
    return jpeg.encode(pixels, quality)


def jpeg_decode(data: bytes) -> np.ndarray:
    return jpeg.decode(data)[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An identity network: a residual seed whose output convolution is zero (in the EMA weights,
    which evaluate must prefer; the plain weights are a fresh, nearly-identity network)."""
    torch.manual_seed(0)
    m = build_model("seed", in_channels=3, residual=True)
    fresh = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m.last.weight.zero_()
    path = tmp_path_factory.mktemp("ckpt") / "seed.pt"
    m.load_state_dict(fresh)
    ema = {k: v.clone() for k, v in m.state_dict().items()}
    ema["last.weight"].zero_()
    return save_network(path, m, "seed", {"residual": True}, ema=ema, config={"data": {"patch": {"grayscale": False}}})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    # 99x83: not multiples of 8: the protocol scores whole images, partial JPEG blocks included
    write(root / "a.png", encode(photo_like(99, 83, seed=1), "PNG"))
    write(root / "sub" / "b.PNG", encode(photo_like(96, 80, seed=2), "PNG"))
    write(root / "c.bmp", encode(photo_like(72, 64, seed=3), "BMP"))
    return root


def _clean(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _psnr(x: np.ndarray, y: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)))


def run_main(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def parse_table(out: str) -> dict[str, tuple]:
    return {m.group(1): (int(m.group(2)), *map(float, m.groups()[2:])) for m in map(ROW.match, out.splitlines()) if m}


def test_the_default_protocol_is_one_table_of_four_qualities_and_the_json_agrees(ckpt, images, tmp_path, capsys):
    js = tmp_path / "res.json"
    rc, out, err = run_main(capsys, "--ckpt", ckpt, "--images", images, "--json", js, "--device", "cpu")
    assert rc == 0, err
    assert "metrics on RGB" in out
    res = json.loads(js.read_text())
    assert res["channel"] == "rgb" and list(res["qualities"]) == ["10", "20", "30", "40"]
    table = parse_table(out)
    assert list(table) == ["10", "20", "30", "40"]
    for q, block in res["qualities"].items():
        assert set(block["images"]) == {"a.png", "sub/b.PNG", "c.bmp"}
        mean = block["mean"]
        assert set(mean) == set(KEYS)
        for k in KEYS:
            assert mean[k] == pytest.approx(np.mean([v[k] for v in block["images"].values()]), abs=1e-9)
        n, pj, pm, pg, worst, sj, sm, sg, bj, bm, bg = table[q]
        assert worst == round(min(v["psnr_model"] - v["psnr_jpeg"] for v in block["images"].values()), 3)
        assert n == 3 and (pj, pm, sj, sm, bj, bm) == (
            round(mean["psnr_jpeg"], 3), round(mean["psnr_model"], 3), round(mean["ssim_jpeg"], 4),
            round(mean["ssim_model"], 4), round(mean["psnrb_jpeg"], 3), round(mean["psnrb_model"], 3))
        assert pg == pytest.approx(mean["psnr_model"] - mean["psnr_jpeg"], abs=6e-4)
    # the identity network changes nothing; lower quality, lower PSNR; blocking lowers PSNR-B only
    means = [res["qualities"][q]["mean"] for q in ("10", "20", "30", "40")]
    assert all(m["psnr_model"] == pytest.approx(m["psnr_jpeg"], abs=1e-9) for m in means)
    assert [m["psnr_jpeg"] for m in means] == sorted(m["psnr_jpeg"] for m in means)
    assert means[0]["psnrb_jpeg"] < means[0]["psnr_jpeg"]


def test_jpeg_figures_are_whole_images_recomputed_independently(ckpt, images):
    res = evaluate(ckpt, images, Protocol((10, 40)), CPU)
    for q in (10, 40):
        for name, vals in res["qualities"][str(q)]["images"].items():
            clean = _clean(images / name)  # whole: 99x83 stays 99x83
            jpeg = np.asarray(Image.open(io.BytesIO(jpeg_encode(clean, q))).convert("RGB"))
            assert vals["psnr_jpeg"] == pytest.approx(_psnr(jpeg, clean), abs=1e-4)  # float32 metrics: 1e-4 dB


def test_opencv_encodes_the_same_jpeg_input(ckpt, images):
    """An independent encoder (OpenCV, libjpeg-turbo with its own wrapper): the JPEG-input PSNR of
    Pillow's path is reproduced to within 0.01 dB, colour (4:2:0) and grayscale."""
    cv2 = require("cv2", "dev")  # opencv-python-headless checks the encoder
    for gray in (False, True):
        res = evaluate(ckpt, images, Protocol((10, 30), gray=gray), CPU)
        for q in (10, 30):
            ours = res["qualities"][str(q)]["mean"]["psnr_jpeg"]
            theirs = []
            for name in res["qualities"][str(q)]["images"]:
                clean = _clean(images / name)
                if gray:
                    ref = matlab_y_u8(clean)
                    ok, data = cv2.imencode(".jpg", ref, [cv2.IMWRITE_JPEG_QUALITY, q])
                    dec = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
                else:
                    ref = clean
                    ok, data = cv2.imencode(".jpg", clean[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, q,
                                                                       cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                                                       cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420])
                    dec = cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]
                theirs.append(_psnr(dec, ref))
            assert ours == pytest.approx(np.mean(theirs), abs=0.01), (gray, q)


def test_gray_protocol_scores_matlab_y_through_an_rgb_network(ckpt, images, tmp_path, capsys):
    js = tmp_path / "gray.json"
    rc, out, err = run_main(capsys, "--ckpt", ckpt, "--images", images, "--quality", 10, "--gray", "--json", js)
    assert rc == 0, err
    assert "grayscale protocol" in out
    res = json.loads(js.read_text())
    assert res["channel"] == "gray"
    for name, vals in res["qualities"]["10"]["images"].items():
        y = matlab_y_u8(_clean(images / name))
        assert 16 <= y.min() and y.max() <= 235
        jpeg = jpeg_decode(jpeg_encode(y[..., None], 10))[..., 0]  # one-channel JPEG
        assert vals["psnr_jpeg"] == pytest.approx(_psnr(jpeg, y), abs=1e-4)
        assert abs(vals["psnr_model"] - vals["psnr_jpeg"]) < 0.01  # the identity, through three channels


def test_gray_protocol_takes_a_grayscale_files_own_values(ckpt, tmp_path):
    gray = photo_like(64, 48, 4, channels=1)[..., 0]
    write(tmp_path / "classic" / "g.png", encode(gray, "PNG"))
    vals = evaluate(ckpt, tmp_path / "classic", Protocol((10,), gray=True), CPU)["qualities"]["10"]["images"]["g.png"]
    jpeg = jpeg_decode(jpeg_encode(gray[..., None], 10))[..., 0]
    assert vals["psnr_jpeg"] == pytest.approx(_psnr(jpeg, gray), abs=1e-4)  # not squeezed into 16-235


def test_y_channel_measures_colour_on_matlab_y(ckpt, images):
    rgb = evaluate(ckpt, images, Protocol((10,)), CPU)["qualities"]["10"]["images"]["a.png"]
    y = evaluate(ckpt, images, Protocol((10,), y_channel=True), CPU)["qualities"]["10"]["images"]["a.png"]
    clean = _clean(images / "a.png")
    jpeg = np.asarray(Image.open(io.BytesIO(jpeg_encode(clean, 10))).convert("RGB"))

    def y_of(a):
        a = a.astype(np.float64)
        return 16 + (65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255

    assert y["psnr_jpeg"] == pytest.approx(_psnr(y_of(jpeg), y_of(clean)), abs=1e-4)
    assert y["psnr_jpeg"] != pytest.approx(rgb["psnr_jpeg"], abs=1e-3)


def test_existing_jpeg_files_are_scored_as_they_are(ckpt, images, tmp_path, capsys):
    inputs = tmp_path / "jpegs"
    for name in ("a.png", "sub/b.PNG", "c.bmp"):
        stem = name.rsplit(".", 1)[0]
        write(inputs / f"{stem}.jpg", jpeg_encode(_clean(images / name), 20))
    write(inputs / "orphan.jpg", jpeg_encode(photo_like(40, 40, 9), 20))
    js = tmp_path / "pairs.json"
    rc, out, err = run_main(capsys, "--ckpt", ckpt, "--inputs", inputs, "--references", images, "--json", js)
    assert rc == 0, err
    assert "orphan" in err and "no reference" in err
    pairs = json.loads(js.read_text())["qualities"]["given"]
    encoded = evaluate(ckpt, images, Protocol((20,)), CPU)["qualities"]["20"]
    assert set(pairs["images"]) == {"a", "sub/b", "c"}
    assert pairs["mean"]["psnr_jpeg"] == pytest.approx(encoded["mean"]["psnr_jpeg"], abs=1e-9)


@pytest.mark.slow
def test_plots_of_quality_and_of_a_run(ckpt, images, tmp_path, capsys):
    require("matplotlib", "plot")  # draws the pictures
    png = tmp_path / "q.png"
    rc, _, err = run_main(capsys, "--ckpt", ckpt, "--images", images, "--quality", 10, 40, "--plot", png)
    assert rc == 0, err
    assert Image.open(png).format == "PNG"
    run = tmp_path / "run"
    write(run / "metrics.jsonl", "\n".join(json.dumps(r) for r in [
        {"event": "start", "step": 0}, {"step": 10, "loss": 0.01, "target": 0.012, "lr": 1e-3},
        {"step": 20, "loss": 0.008, "target": 0.012, "lr": 1e-3},
        {"step": 20, "val_psnr": 28.1, "val_psnr_jpeg": 27.5, "val_ssim": 0.8, "val_ssim_jpeg": 0.78},
    ]).encode())
    p = subprocess.run([sys.executable, "-m", "restorer", "plot", str(run)], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert Image.open(run / "curves.png").size[0] > 500
    p = subprocess.run([sys.executable, "-m", "restorer", "plot", str(tmp_path / "nothing")], capture_output=True,
                       text=True, cwd=REPO)
    assert p.returncode == 2 and p.stderr.startswith("restorer plot: error: no metrics.jsonl") and p.stderr.count("\n") == 1


def test_unreadable_image_is_skipped_with_a_warning(ckpt, images, tmp_path, capsys):
    d = tmp_path / "imgs"
    write(d / "good.png", encode(photo_like(64, 64, seed=5), "PNG"))
    write(d / "bad.jpg", b"\xff\xd8 definitely not a jpeg")
    rc, out, err = run_main(capsys, "--ckpt", ckpt, "--images", d, "--quality", 10)
    assert rc == 0 and parse_table(out)["10"][0] == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("restorer evaluate: warning:") and "bad.jpg" in lines[0]


def test_references_that_are_jpegs_of_a_quality_scored_get_one_warning(ckpt, tmp_path, capsys):
    d = tmp_path / "imgs"
    write(d / "clean.png", encode(photo_like(64, 64, seed=5), "PNG"))
    write(d / "once80.jpg", encode(photo_like(64, 64, seed=6), "JPEG", quality=80))
    write(d / "once97.jpg", encode(photo_like(64, 64, seed=7), "JPEG", quality=97))
    rc, _, err = run_main(capsys, "--ckpt", ckpt, "--images", d, "--quality", 30, 90)
    assert rc == 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("restorer evaluate: warning: 1 reference(s) are JPEGs"), err
    assert "once80.jpg (q80)" in lines[0] and "once97" not in lines[0]
    rc, _, err = run_main(capsys, "--ckpt", ckpt, "--images", d, "--quality", 30, 70)  # all below q80: nothing to say
    assert rc == 0 and err == ""


@pytest.mark.parametrize("case", ["missing_ckpt", "no_images", "quality_0", "bad_ckpt", "both_modes", "gray_and_y",
                                  "pairs_with_quality"])
def test_errors_exit_2_one_line(case, ckpt, images, tmp_path, capsys):
    args = ["--ckpt", ckpt, "--images", images, "--quality", 10]
    if case == "missing_ckpt":
        args[1] = tmp_path / "nope.pt"
    elif case == "no_images":
        write(tmp_path / "empty" / "readme.txt", b"x")
        args[3] = tmp_path / "empty"
    elif case == "quality_0":
        args[5] = 0
    elif case == "bad_ckpt":
        args[1] = write(tmp_path / "bad.pt", b"garbage")
    elif case == "both_modes":
        args += ["--inputs", images]
    elif case == "gray_and_y":
        args += ["--gray", "--y-channel"]
    elif case == "pairs_with_quality":
        args[2:4] = ["--inputs", images, "--references", images]
    rc, out, err = run_main(capsys, *args)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("restorer evaluate: error: "), err


def test_ema_preferred_and_a_grayscale_network(ckpt, images, tmp_path, capsys):
    state = load_state(ckpt)
    save_state(tmp_path / "noema.pt", {k: v for k, v in state.items() if k != "ema"})
    a = evaluate(ckpt, images, Protocol((10,)), CPU)["qualities"]["10"]["mean"]
    b = evaluate(tmp_path / "noema.pt", images, Protocol((10,)), CPU)["qualities"]["10"]["mean"]
    assert a["psnr_jpeg"] == b["psnr_jpeg"] and abs(b["psnr_model"] - a["psnr_model"]) > 0.05
    g = build_model("seed", in_channels=1, residual=True)
    save_network(tmp_path / "gray.pt", g, "seed", {"residual": True}, channels=1, grayscale=True)
    js = tmp_path / "gray.json"
    rc, out, err = run_main(capsys, "--ckpt", tmp_path / "gray.pt", "--images", images, "--quality", 10, "--json", js)
    assert rc == 0, err
    assert "the luma it trains on" in out and parse_table(out)["10"][0] == 3
    # scored on the luma it trains on (Pillow's L, full range), not MATLAB's 16-235 Y
    vals = json.loads(js.read_text())["qualities"]["10"]["images"]["a.png"]
    luma = np.asarray(Image.fromarray(_clean(images / "a.png")).convert("L"))
    assert vals["psnr_jpeg"] == pytest.approx(_psnr(jpeg_decode(jpeg_encode(luma[..., None], 10))[..., 0], luma), abs=1e-4)
    rc, out, err = run_main(capsys, "--ckpt", tmp_path / "gray.pt", "--images", images, "--quality", 10, "--gray")
    assert rc == 0 and "grayscale protocol" in out, err  # the papers' benchmark: MATLAB Y


# ----------------------------------------------------------------------------- the JPEGs people have


def _conditioned(tmp_path):
    torch.manual_seed(4)
    model = build_model("unet", widths=[4, 8], conditioning="decoder")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "film" in n or "cond" in n or n == "tail.weight":
                p.normal_(0, 0.2)
    return save_network(tmp_path / "cond.pt", model, "unet", {"widths": [4, 8], "conditioning": "decoder"},
                        config={"data": {"jpeg": {"quality": [10, 95]}}})


def test_a_sweep_of_chroma_and_double_jpegs_feeds_the_network_its_tables_quality(images, tmp_path, capsys):
    ckpt = _conditioned(tmp_path)
    js = tmp_path / "sweep.json"
    rc, out, err = run_main(capsys, "--ckpt", ckpt, "--images", images, "--sweep", "--chroma", "444", "--json", js)
    assert rc == 0, err
    assert list(parse_table(out)) == [str(q) for q in SWEEP] and "4:4:4" in out
    res = json.loads(js.read_text())
    assert res["chroma"] == "444" and res["double"] is None
    net = load_network(ckpt, "cpu")
    clean = _clean(images / "a.png")
    for q in (10, 70):
        data = jpeg.encode(clean, q, "444")
        pixels, read_back = jpeg.decode(data)
        assert read_back == q
        out_img = restore_array(net, pixels, tile=1024, overlap=32, batch=4, quality=q, bounds=jpeg.file_bounds(data))
        expected = 10 * np.log10(255**2 / np.mean((out_img.astype(np.float64) - clean) ** 2))
        assert res["qualities"][str(q)]["images"]["a.png"]["psnr_model"] == pytest.approx(expected, abs=1e-3)
    # double JPEG: first at Q1, the grid shifted 1-7 px (fixed per image), then the quality of the row
    res = evaluate(ckpt, images, Protocol((50,), double=20), CPU)
    assert res["double"] == 20
    dy, dx = double_shift("a.png")
    assert 1 <= dy <= 7 and 1 <= dx <= 7
    once = jpeg.decode(jpeg.encode(clean, 20))[0]
    twice = jpeg.decode(jpeg.encode(np.ascontiguousarray(once[dy:, dx:]), 50))[0]
    ref = clean[dy:, dx:]
    assert res["qualities"]["50"]["images"]["a.png"]["psnr_jpeg"] == pytest.approx(_psnr(twice, ref), abs=1e-4)
    single = evaluate(ckpt, images, Protocol((50,)), CPU)["qualities"]["50"]["images"]["a.png"]["psnr_jpeg"]
    assert res["qualities"]["50"]["images"]["a.png"]["psnr_jpeg"] < single - 0.3  # the first, coarse JPEG shows


def test_metrics_in_float32_agree_with_float64(images):
    from restorer.infer.metrics import psnr, psnr_b, ssim

    clean = _clean(images / "a.png")
    noisy = jpeg_decode(jpeg_encode(clean, 10))
    to = lambda a, dtype: torch.from_numpy(a.astype(np.float64) / 255).permute(2, 0, 1)[None].to(dtype)  # noqa: E731
    for f, tol in ((psnr, 1e-4), (ssim, 1e-5), (psnr_b, 1e-4)):
        d64 = float(f(to(noisy, torch.float64), to(clean, torch.float64))[0])
        d32 = float(f(to(noisy, torch.float32), to(clean, torch.float32))[0])
        assert abs(d64 - d32) < tol, (f.__name__, d64, d32)


def test_a_plot_of_the_gain_and_the_sweeps_mistakes(images, tmp_path, capsys):
    require("matplotlib", "plot")  # draws the pictures
    ckpt = _conditioned(tmp_path)
    png = tmp_path / "gain.png"
    rc, _, err = run_main(capsys, "--ckpt", ckpt, "--images", images, "--quality", 30, 90, "--double", 20, "--plot", png)
    assert rc == 0, err
    assert Image.open(png).format == "PNG"
    for args, message in ((["--sweep", "--quality", 10], "give --quality or --sweep, not both"),
                          (["--double", 0], "--double: must be a quality in 1..100"),
                          (["--quality", 101], "--quality: must be in 1..100"),
                          (["--chroma", "411"], "argument --chroma: invalid choice")):
        rc, _, err = run_main(capsys, "--ckpt", ckpt, "--images", images, *args)
        assert rc == 2 and err.startswith("restorer evaluate: error: ") and message in err and err.count("\n") == 1, err


def test_outputs_are_scored_inside_their_files_bounds_as_restore_writes_them(images, tmp_path, capsys):
    """A network that adds its own errors, at q90 4:4:4: scored as restore writes its outputs (moved
    inside their JPEG files' bins, nearer the originals) and, with --no-file-bounds, alone."""
    torch.manual_seed(1)
    m = build_model("seed", in_channels=3, residual=True)
    with torch.no_grad():
        m.last.weight.normal_(0, 0.05)
    path = save_network(tmp_path / "noisy.pt", m, "seed", {"residual": True}, config={"data": {"patch": {"grayscale": False}}})
    bounded = evaluate(path, images, Protocol((90,), chroma="444"), CPU)
    alone = evaluate(path, images, Protocol((90,), chroma="444", file_bounds=False), CPU)
    assert bounded["file_bounds"] is True and alone["file_bounds"] is False
    for name, fig in bounded["qualities"]["90"]["images"].items():
        other = alone["qualities"]["90"]["images"][name]
        assert fig["psnr_jpeg"] == other["psnr_jpeg"]
        assert other["psnr_model"] < other["psnr_jpeg"] and fig["psnr_model"] > other["psnr_model"] + 0.5
    rc, out, err = run_main(capsys, "--ckpt", path, "--images", images, "--quality", "90", "--chroma", "444",
                            "--no-file-bounds")
    assert rc == 0, err
    assert "network alone" in out
    assert parse_table(out)["90"][2] == pytest.approx(alone["qualities"]["90"]["mean"]["psnr_model"], abs=1e-3)


# ----------------------------------------------------------------------------- images too small to score


def test_images_under_ssims_window_are_skipped_with_one_warning_that_counts_them(ckpt, images, tmp_path, capsys):
    d = tmp_path / "imgs"
    write(d / "good.png", encode(photo_like(64, 48, seed=5), "PNG"))
    write(d / "seven_by_three.jpg", encode(photo_like(7, 3, seed=6), "JPEG", quality=95))
    write(d / "one_row.png", encode(photo_like(40, 1, seed=7), "PNG"))
    write(d / "eleven.png", encode(photo_like(11, 11, seed=8), "PNG"))  # the smallest that can be scored
    rc, out, err = run_main(capsys, "--ckpt", ckpt, "--images", d, "--quality", 30)
    assert rc == 0 and parse_table(out)["30"][0] == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("restorer evaluate: warning: 2 image(s) under 11 px a side"), err
    assert "one_row.png (40x1)" in lines[0] and "seven_by_three.jpg (7x3)" in lines[0]
    # --double cuts 1-7 px from the top and the left: 11 px becomes too few, and is said alike
    rc, out, err = run_main(capsys, "--ckpt", ckpt, "--images", d, "--quality", 30, "--double", 50)
    assert rc == 0 and parse_table(out)["30"][0] == 1, err
    assert "3 image(s) under 11 px a side" in err and "eleven.png" in err and "Traceback" not in err
    # and when nothing is left, one line that says why
    for name in ("good.png", "eleven.png"):
        (d / name).unlink()
    rc, out, err = run_main(capsys, "--ckpt", ckpt, "--images", d, "--quality", 30)
    assert rc == 2 and err.count("\n") == 1 and "2 under 11 px a side" in err, err


def test_pairs_under_ssims_window_are_skipped_with_one_warning_that_counts_them(ckpt, tmp_path, capsys):
    for name, (w, h) in {"good": (64, 48), "tiny": (7, 3)}.items():
        clean = photo_like(w, h, seed=9)
        write(tmp_path / "refs" / f"{name}.png", encode(clean, "PNG"))
        write(tmp_path / "jpegs" / f"{name}.jpg", encode(clean, "JPEG", quality=30))
    rc, out, err = run_main(capsys, "--ckpt", ckpt, "--inputs", tmp_path / "jpegs", "--references", tmp_path / "refs")
    assert rc == 0 and parse_table(out)["given"][0] == 1, err
    assert err.strip().splitlines() == ["restorer evaluate: warning: 1 image(s) under 11 px a side (SSIM's 11x11 window) "
                                        "skipped: tiny (7x3)"]


@pytest.mark.parametrize(("options", "smallest"), [(["--max-side", 8], 11), (["--max-side", -1], 11),
                                                   (["--max-side", 17, "--double", 50], 18)])
def test_a_max_side_under_ssims_window_is_one_line_before_any_work(ckpt, tmp_path, capsys, options, smallest):
    # the images folder does not exist: the option is judged first
    rc, out, err = run_main(capsys, "--ckpt", ckpt, "--images", tmp_path / "nowhere", "--quality", 30, *options)
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"restorer evaluate: error: --max-side: must be >= {smallest} "), err


def test_a_max_side_of_ssims_window_scores_every_image(ckpt, images, capsys):
    rc, out, err = run_main(capsys, "--ckpt", ckpt, "--images", images, "--quality", 30, "--max-side", 11)
    assert rc == 0 and err == "" and parse_table(out)["30"][0] == 3, err
