"""bench/field.py: the field's benchmarks (LIVE1 colour and gray, Classic5) scored with restorer.tools.evaluate's
own code, next to the published figures; on a small copy of the real sets (96x96 centre crops)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from helpers import BENCHMARK_SETS as SETS, BENCHMARKS, REPO, cli_here, require_benchmarks, save_network, small_benchmarks
from restorer.tools.evaluate import main as evaluate_main
from restorer.models import build_model

GRAY = {"LIVE1_color": False, "LIVE1_gray": True, "Classic5": True}
QUALITIES = ("10", "20", "30", "40")


def _field():
    spec = importlib.util.spec_from_file_location("bench_field", REPO / "bench" / "field.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


field = _field()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Two images of each set, 96x96 centre crops, in the same formats and modes; and Real/ (skipped)."""
    return small_benchmarks(tmp_path_factory.mktemp("benchmarks"))


def _ckpt(path, seed: int, zero: bool):
    """A tiny residual seed network; `zero`: its last convolution zeroed (the identity)."""
    torch.manual_seed(seed)
    m = build_model("seed", in_channels=3, residual=True)
    if zero:
        with torch.no_grad():
            m.last.weight.zero_()
    return save_network(path, m, "seed", {"residual": True})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return [_ckpt(d / "identity.pt", 0, True), _ckpt(d / "fresh.pt", 1, False)]


def _evaluate_json(tmp_path, ckpt, images, gray: bool) -> dict:
    js = tmp_path / f"{images.name}-{gray}.json"
    p = cli_here(evaluate_main, "--ckpt", ckpt, "--images", images, "--quality", *QUALITIES, "--json", js,
                 "--device", "cpu", *(["--gray"] if gray else []))
    assert p.returncode == 0, p.stderr
    return json.loads(js.read_text())


def _run(*args):
    p = cli_here(field.main, *args)
    lines = p.stdout.strip().splitlines()
    return p, lines, json.loads(lines[-1]) if p.returncode == 0 else None


def _blocks(lines: list[str]) -> dict[tuple[str, str], list[str]]:
    """(set, quality) -> the row names printed under it."""
    out, current_set, q = {}, None, None
    for line in lines[:-1]:
        if line and not line.startswith(" ") and ":" in line:
            current_set = line.split(":")[0]
        elif line.strip().startswith("q") and "PSNR" in line:
            q = line.split()[0][1:]
            out[(current_set, q)] = []
        elif line.startswith("  ") and q is not None:
            out[(current_set, q)].append(line[2:].rsplit(None, 3)[0].strip())
    return out


def test_jpeg_only_prints_every_set_and_quality_and_reproduces_evaluate(bench, ckpts, tmp_path):
    p, lines, res = _run("--jpeg-only", "--benchmarks", bench)
    assert p.returncode == 0, p.stderr
    blocks = _blocks(lines)
    assert set(blocks) == {(s, q) for s in SETS for q in QUALITIES}
    assert all(rows == ["JPEG", field.JPEG_ROW] for rows in blocks.values())
    assert "Real" not in res["sets"] and "skipped (no originals): Real" in p.stdout
    assert set(res["sets"]) == set(SETS) and res["checkpoints"] == []
    for name in SETS:
        expected = _evaluate_json(tmp_path, ckpts[0], bench / name, GRAY[name])
        for q in QUALITIES:
            got, want = res["sets"][name][q], expected["qualities"][q]["mean"]
            assert got["images"] == 2
            for metric in ("psnr", "ssim", "psnrb"):
                assert got["jpeg_measured"][metric] == pytest.approx(want[f"{metric}_jpeg"], abs=1e-9)
            assert got["jpeg_published_psnr"] == field.PUBLISHED[name][int(q)]["JPEG"][0]
    assert res["sets"]["LIVE1_gray"]["10"]["jpeg_published_psnr"] == 27.77
    # --max-images: the first image only, and its figures are evaluate's on that one image
    p1, _, one = _run("--jpeg-only", "--benchmarks", bench, "--max-images", "1")
    assert p1.returncode == 0, p1.stderr
    assert all(one["sets"][s][q]["images"] == 1 for s in SETS for q in QUALITIES)
    assert one["sets"]["Classic5"]["10"]["jpeg_measured"]["psnr"] != res["sets"]["Classic5"]["10"]["jpeg_measured"]["psnr"]


def test_a_row_of_ours_per_checkpoint_and_gray_sets_use_the_gray_protocol(bench, ckpts, tmp_path):
    p, lines, res = _run("--ckpt", *ckpts, "--benchmarks", bench, "--device", "cpu")
    assert p.returncode == 0, p.stderr
    blocks = _blocks(lines)
    assert set(blocks) == {(s, q) for s in SETS for q in QUALITIES}
    for (name, q), rows in blocks.items():
        published = [m for m in field.METHODS if m in field.PUBLISHED[name][int(q)]]
        assert rows == [*published, field.JPEG_ROW, "identity.pt", "fresh.pt"]
    assert blocks[("LIVE1_gray", "10")][:7] == list(field.METHODS)  # every paper's row where published
    for name in SETS:
        for q in QUALITIES:
            entry = res["sets"][name][q]
            assert set(entry["ours"]) == {str(c) for c in ckpts}
            # the (nearly) identity network scores the JPEG; the two rows are each checkpoint's own
            ident, fresh = entry["ours"][str(ckpts[0])], entry["ours"][str(ckpts[1])]
            assert ident["psnr"] == pytest.approx(entry["jpeg_measured"]["psnr"], abs=0.01)
            assert fresh != ident
    fresh_eval = _evaluate_json(tmp_path, ckpts[1], bench / "Classic5", True)
    assert res["sets"]["Classic5"]["20"]["ours"][str(ckpts[1])]["psnr"] == pytest.approx(
        fresh_eval["qualities"]["20"]["mean"]["psnr_model"], abs=1e-9)
    # gray sets use evaluate --gray: the same colour images in every set folder, the gray sets' JPEG PSNR
    # is the gray protocol's (MATLAB Y, one-channel JPEG), which differs from the colour protocol's
    same = tmp_path / "same"
    for name in SETS:
        (same / name).mkdir(parents=True)
        for path in (bench / "LIVE1_color").iterdir():
            (same / name / path.name).write_bytes(path.read_bytes())
    as_gray = _evaluate_json(tmp_path, ckpts[0], same / "LIVE1_color", True)["qualities"]["10"]["mean"]["psnr_jpeg"]
    as_rgb = _evaluate_json(tmp_path, ckpts[0], same / "LIVE1_color", False)["qualities"]["10"]["mean"]["psnr_jpeg"]
    assert abs(as_gray - as_rgb) > 0.1
    p2, _, res2 = _run("--jpeg-only", "--benchmarks", same)
    assert p2.returncode == 0, p2.stderr
    for name, gray in GRAY.items():
        got = res2["sets"][name]["10"]["jpeg_measured"]["psnr"]
        assert got == pytest.approx(as_gray if gray else as_rgb, abs=1e-9), name


def test_the_published_table_is_the_readme_s():
    require_benchmarks()
    readme = (BENCHMARKS / "README.md").read_text()
    jpeg = {"LIVE1_color": (25.69, 28.06, 29.37, 30.28), "LIVE1_gray": (27.77, 30.07, 31.41, 32.35),
            "Classic5": (27.82, 30.12, 31.48, 32.43)}
    for name, row in jpeg.items():
        assert tuple(field.PUBLISHED[name][int(q)]["JPEG"][0] for q in QUALITIES) == row
        assert field.PUBLISHED[name]["source"]
        for q in QUALITIES:
            for method, figures in field.PUBLISHED[name][int(q)].items():
                assert method in field.METHODS
                psnr, ssim, psnrb = figures
                text = f"{psnr:.2f}" + (f" / {ssim:.3f} / {psnrb:.2f}" if ssim is not None else "")
                assert text in readme, (name, q, method, text)
    # the FBCNN paper's gray table, row by row, as the README prints it
    for name, label in (("Classic5", "Classic5"), ("LIVE1_gray", "LIVE1")):
        for q in QUALITIES:
            row = field.PUBLISHED[name][int(q)]
            cells = [" / ".join(f"{v:.3f}" if i == 1 else f"{v:.2f}" for i, v in enumerate(row[m]) if v is not None)
                     for m in ("JPEG", "ARCNN", "DnCNN", "QGAC", "FBCNN")]
            assert f"| {label} | {q} | {' | '.join(cells)} |" in readme
    assert (f"SwinIR {field.PUBLISHED['LIVE1_gray'][10]['SwinIR'][0]:.2f}, MambaIRv2 "
            f"{field.PUBLISHED['LIVE1_gray'][10]['MambaIRv2'][0]:.2f} (Classic5 "
            f"{field.PUBLISHED['Classic5'][10]['SwinIR'][0]:.2f}, {field.PUBLISHED['Classic5'][10]['MambaIRv2'][0]:.2f})"
            in readme)
    swinir = " / ".join(f"{field.PUBLISHED['LIVE1_color'][int(q)]['SwinIR'][0]:.2f}" for q in QUALITIES)
    assert f"quality) {swinir}" in readme.replace("\n", " ")


def test_bad_input_is_one_line_and_exit_2(bench, ckpts, tmp_path):
    (tmp_path / "empty").mkdir()
    for args, says in [(("--ckpt", tmp_path / "nope.pt", "--benchmarks", bench), "nope.pt"),
                       (("--ckpt", ckpts[0], "--benchmarks", tmp_path / "empty"), "none of the sets"),
                       (("--jpeg-only", "--benchmarks", tmp_path / "empty"), "none of the sets"),
                       (("--jpeg-only", "--benchmarks", tmp_path / "missing"), "not found"),
                       (("--benchmarks", bench), "--jpeg-only")]:
        p = cli_here(field.main, *args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("field: error: ") and says in lines[0], (args, p.stderr)
        assert "Traceback" not in p.stderr and p.stdout == ""
