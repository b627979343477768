"""The demo pipeline end to end on a small budget: shards, torchrun training, evaluate, restore."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from helpers import REPO

pytest.importorskip("skimage")


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "restorer.demo", "--out", str(tmp_path), "--steps", "4"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "demo finished: on astronaut.png" in p.stdout and "PSNR  JPEG" in p.stdout
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert list(result["qualities"]) == ["10", "20", "30", "40"]
    mean = result["qualities"]["10"]["mean"]
    assert set(mean) == {"psnr_jpeg", "psnr_model", "ssim_jpeg", "ssim_model", "psnrb_jpeg", "psnrb_model"}
    assert 20 < mean["psnr_jpeg"] < 40
    restored = Image.open(tmp_path / "restored" / "astronaut.png")
    assert restored.size == (512, 512)
    assert (tmp_path / "restored" / "astronaut_compare.png").exists()
    assert (tmp_path / "run" / "last.pt").exists()
