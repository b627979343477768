"""The demo pipeline end to end on a small budget: shards, torchrun training, evaluate, restore."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from helpers import BENCHMARK_SETS, BENCHMARKS, REPO, require, small_benchmarks

require("skimage", "demo")


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    there = all((BENCHMARKS / s).is_dir() for s in BENCHMARK_SETS) or os.environ.get("CI")  # (CI: must be)
    bench = small_benchmarks(tmp_path / "benchmarks", images=1, side=64) if there else tmp_path / "none"
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-m", "restorer", "demo", "--out", str(out), "--steps", "4",
                        "--benchmarks", str(bench)], capture_output=True, text=True, cwd=REPO, env=env, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "demo finished: one network for every JPEG quality, on astronaut.png" in p.stdout
    assert "PSNR gain" in p.stdout and "at q10: PSNR JPEG" in p.stdout
    # where it stands on the field's table: one line a set at q10, its figures evaluate's, the papers' beside
    if not there:
        assert f"field table: no benchmarks in {bench}" in p.stdout
    for name in BENCHMARK_SETS if there else ():
        m = json.loads((out / f"field_{name}.json").read_text())["qualities"]["10"]["mean"]
        line = next(x for x in p.stdout.splitlines() if x.strip().startswith(name))
        assert f"JPEG {m['psnr_jpeg']:.2f} -> ours {m['psnr_model']:.2f}" in line and "FBCNN" in line and "blind-unet5" in line, line
    assert not there or "DnCNN 29.19" in next(x for x in p.stdout.splitlines() if x.strip().startswith("LIVE1_gray"))
    result = json.loads((out / "evaluation.json").read_text())
    assert list(result["qualities"]) == ["10", "20", "30", "40", "50", "60", "70", "80", "90", "95"]
    means = [result["qualities"][q]["mean"] for q in result["qualities"]]
    assert set(means[0]) == {"psnr_jpeg", "psnr_model", "ssim_jpeg", "ssim_model", "psnrb_jpeg", "psnrb_model"}
    assert 20 < means[0]["psnr_jpeg"] < 40 and means[-1]["psnr_jpeg"] > means[0]["psnr_jpeg"] + 8
    assert any(abs(m["psnr_model"] - m["psnr_jpeg"]) > 1e-3 for m in means)  # the network trained: it changes them
    # a few steps from its initialisation (near the identity) never make a photo worse: no quality loses
    # more than half a dB, nor any SSIM (a network that spoilt its input loses 20 dB and more)
    for q, m in result["qualities"].items():
        assert m["mean"]["psnr_model"] - m["mean"]["psnr_jpeg"] >= -0.5, (q, m["mean"])
        assert m["mean"]["ssim_model"] >= m["mean"]["ssim_jpeg"] - 0.002, (q, m["mean"])
    restored = Image.open(out / "restored" / "astronaut.png")
    assert restored.size == (512, 512)
    assert (out / "restored" / "astronaut_compare.png").exists()
    assert (out / "run" / "last.pt").exists()
