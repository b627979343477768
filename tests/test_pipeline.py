"""The streaming pipeline: the degradation distribution, seeding, equal work per rank, exact
validation coverage, corrupt data, URL patterns. Real tar shards, real JPEG bytes, real
multi-process DataLoaders."""

from __future__ import annotations

import collections
import itertools
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import REPO, TINY, assert_ok, cli_here, encode, metrics, photo_like, write
from restorer.data import jpeg
from restorer.data.jpeg import JpegSpec
from restorer.data.patches import PatchSpec, center_crop, random_patch, training_pair
from restorer.data.manifest import load_manifest, shard_paths
from restorer.formats.config import ConfigError, DataConfig
from restorer.train.loader import SkipLog, read_images, steps_per_epoch, train_loader, val_loader
from restorer.data.sharding import PackOptions, run


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255**2 / mse)


# ----------------------------------------------------------------------------- the patch distribution

RAMP = 0.75  # grey levels per source pixel: fine enough to read a scale to 1%


@pytest.fixture(scope="module")
def ramp_image() -> np.ndarray:
    """R grows with x, G with y: a target patch tells where it came from, its scale and rotation."""
    yy, xx = np.mgrid[0:300, 0:320].astype(np.float64)
    return np.stack([xx * RAMP, yy * RAMP, np.full_like(xx, 128)], -1).astype(np.uint8)


def _geometry(target: np.ndarray) -> tuple[float, int]:
    """(scale, rotation in quarter turns) from a ramp patch's gradients."""
    t = target[8:-8, 8:-8].astype(np.float64)  # away from rounding at the borders
    d_col = np.mean(np.diff(t[..., 0], axis=1))
    d_row = np.mean(np.diff(t[..., 0], axis=0))
    grad = max(abs(d_col), abs(d_row))
    quarter = {(True, True): 0, (False, False): 1, (True, False): 2, (False, True): 3}[
        (abs(d_col) > abs(d_row), (d_col if abs(d_col) > abs(d_row) else d_row) > 0)]
    return RAMP / grad, quarter


def test_rescale_and_rotation_follow_the_seed_distribution(ramp_image):
    rng = np.random.default_rng(0)
    scales, quarters = collections.Counter(), collections.Counter()
    n = 1600
    for _ in range(n):
        target = random_patch(ramp_image, PatchSpec(), rng)
        assert target.shape == (128, 128, 3) and target.dtype == np.uint8 and target.flags.c_contiguous
        scale, quarter = _geometry(target)
        nearest = min((1.0, 0.9, 0.8, 0.7, 0.6), key=lambda s: abs(s - scale))
        assert abs(nearest - scale) < 0.02, scale
        scales[nearest] += 1
        quarters[quarter] += 1
    # binomial standard deviations: 0.0125 for p=0.5, 0.008 for p=0.125 and 0.009 for p=1/6
    assert abs(scales[1.0] / n - 0.5) < 0.05
    for s in (0.9, 0.8, 0.7, 0.6):
        assert abs(scales[s] / n - 0.125) < 0.035
    assert abs(quarters[0] / n - 0.5) < 0.05
    for q in (1, 2, 3):
        assert abs(quarters[q] / n - 1 / 6) < 0.04


def test_photo_side_sees_a_large_photo_at_that_side_and_leaves_a_smaller_one_alone(ramp_image):
    """photo_side=80 on the 320 x 300 ramp: each patch is cut from the photo at 80 px (a quarter: the ramp
    four times as steep), times the rescale drawn; a photo no larger than photo_side is cut as before."""
    rng = np.random.default_rng(5)
    plain = PatchSpec(size=32, rescale_p=0.0, rotate_p=0.0)
    seen = PatchSpec(size=32, rescale_p=0.0, rotate_p=0.0, photo_side=80)
    for _ in range(20):
        assert _geometry(random_patch(ramp_image, seen, rng))[0] == pytest.approx(0.25, rel=0.03)
    both = PatchSpec(size=32, rescale_p=1.0, scales=(0.5,), rotate_p=0.0, photo_side=160)
    assert _geometry(random_patch(ramp_image, both, rng))[0] == pytest.approx(0.25, rel=0.03)  # 1/2 x 160/320
    small = PatchSpec(size=32, rescale_p=0.0, rotate_p=0.0, photo_side=320)
    a, b = np.random.default_rng(6), np.random.default_rng(6)
    for _ in range(5):
        assert np.array_equal(random_patch(ramp_image, small, a), random_patch(ramp_image, plain, b))
    with pytest.raises(ValueError, match="photo_side: must be 0"):
        PatchSpec(size=32, photo_side=16).validate()


def test_crops_cover_the_whole_image(ramp_image):
    rng = np.random.default_rng(1)
    spec = PatchSpec(rescale_p=0.0, rotate_p=0.0)
    xs, ys = [], []
    for _ in range(400):
        target = random_patch(ramp_image, spec, rng)
        xs.append(target[0, 0, 0] / RAMP)
        ys.append(target[0, 0, 1] / RAMP)
    h, w = ramp_image.shape[:2]
    for pos, limit in ((xs, w - 128), (ys, h - 128)):
        assert min(pos) < 0.03 * limit + 5 and max(pos) > 0.97 * limit - 5
        assert abs(np.mean(pos) / limit - 0.5) < 0.06  # uniform, not centred or cornered


def test_flips_give_all_eight_dihedral_modes(ramp_image):
    rng = np.random.default_rng(2)
    spec = PatchSpec(rescale_p=0.0, rotate_p=0.75, flip_p=0.5)
    modes = set()
    for _ in range(200):
        t = random_patch(ramp_image, spec, rng)
        c = t[1:-1, 1:-1, :2].astype(int)
        # direction of the R and G ramps along columns and rows identifies the dihedral element
        modes.add(tuple(np.sign([np.diff(c[..., k], axis=a).mean() for k in (0, 1) for a in (0, 1)]).astype(int)))
    assert len(modes) == 8


def test_channel_permutation_gives_all_six_orders_when_asked_and_none_otherwise():
    image = np.zeros((200, 200, 3), np.uint8) + np.array([10, 100, 200], np.uint8)
    rng = np.random.default_rng(9)
    orders = collections.Counter(tuple(random_patch(image, PatchSpec(size=32, permute_channels_p=1.0), rng)[0, 0])
                                 for _ in range(300))
    assert set(orders) == set(itertools.permutations((10, 100, 200))) and min(orders.values()) > 20
    half = [tuple(random_patch(image, PatchSpec(size=32, permute_channels_p=0.5), rng)[0, 0]) for _ in range(400)]
    assert 0.35 < sum(o != (10, 100, 200) for o in half) / 400 < 0.55  # p=0.5: 5 of 6 orders differ
    assert {tuple(random_patch(image, PatchSpec(size=32), rng)[0, 0]) for _ in range(50)} == {(10, 100, 200)}


def test_input_is_exactly_the_jpeg_of_the_target_and_its_tables_say_the_quality():
    image = photo_like(400, 300, 3)
    rng = np.random.default_rng(3)
    for quality in (10, 40):
        data, target = training_pair(image, PatchSpec(), JpegSpec(quality=(quality, quality)), rng)
        assert data == jpeg.encode(target, quality)  # re-encoding matches byte for byte
        decoded, read_back = jpeg.decode(data)
        assert decoded.shape == target.shape and read_back == quality
        band = (22, 34) if quality == 10 else (28, 42)
        assert band[0] < psnr(decoded, target) < band[1], psnr(decoded, target)


def test_quality_knots_and_weights_and_grayscale():
    image = photo_like(300, 300, 4)
    rng = np.random.default_rng(4)
    drawn = [jpeg.decode(training_pair(image, PatchSpec(size=32), JpegSpec(quality=(10, 60)), rng)[0])[1]
             for _ in range(60)]
    assert min(drawn) >= 10 and max(drawn) <= 60 and len(set(drawn)) > 20  # uniform over the range
    # FBCNN's recipe: three quarters in [10, 60], a quarter in [60, 95]
    spec = JpegSpec(quality=(10, 60, 95), quality_weights=(0.75, 0.25))
    qs = np.array([spec.draw_quality(rng) for _ in range(4000)])
    assert qs.min() >= 10 and qs.max() <= 95 and {10, 95} <= set(qs.tolist())
    assert abs((qs < 60).mean() - 0.75) < 0.03, (qs < 60).mean()
    assert spec.qualities == (10, 95)
    data, target = training_pair(image, PatchSpec(grayscale=True), JpegSpec(), rng)
    assert target.shape == (128, 128, 1) and jpeg.decode(data)[0].shape == (128, 128, 1)


@pytest.mark.parametrize("shape", [(50, 70), (128, 128), (130, 400), (90, 1000)])
def test_small_images_are_upscaled_not_refused(shape):
    image = photo_like(shape[1], shape[0], 5)
    rng = np.random.default_rng(5)
    for _ in range(20):
        data, target = training_pair(image, PatchSpec(), JpegSpec(double_p=0.5), rng)
        assert target.shape == (128, 128, 3) and jpeg.decode(data)[0].shape == (128, 128, 3)


def test_center_crop_is_block_aligned_and_its_jpeg_deterministic():
    image = photo_like(301, 203, 6)
    crop = center_crop(image, 256)
    assert crop.shape == (200, 256, 3)
    np.testing.assert_array_equal(crop, image[1:201, 22:278])
    a, b = jpeg.compress(crop, 10, "444"), jpeg.compress(center_crop(image, 256), 10, "444")
    assert a[0] == b[0] and _sampling(a[0]) == "444"
    # validation's chroma: the spec's, or with random one fixed per image, all three across images
    assert jpeg.val_chroma(JpegSpec(chroma="422"), "k") == "422"
    picks = {jpeg.val_chroma(JpegSpec(chroma="random"), f"key{i}") for i in range(30)}
    assert picks == {"444", "422", "420"} and jpeg.val_chroma(JpegSpec(chroma="random"), "k1") == \
        jpeg.val_chroma(JpegSpec(chroma="random"), "k1")


# ----------------------------------------------------------------------------- shards and loaders


def _flat_images(folder: Path, n: int, size=(160, 140)) -> dict[int, int]:
    """n images of one flat colour each (any crop, rescale or JPEG keeps its mean): index -> red."""
    colours = {}
    for i in range(n):
        v = 20 + 21 * i
        arr = np.zeros((size[1], size[0], 3), np.uint8) + np.array([v % 256, (v * 7) % 256, 128], np.uint8)
        write(folder / f"flat{i:02d}.png", encode(arr, "PNG"))
        colours[i] = v % 256
    return colours


def _pack(src: Path, out: Path, **kw) -> Path:
    run(PackOptions(sources=(str(src),), **kw), out, workers=1, force=True, log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i in range(10):
        write(root / "src" / f"p{i}.jpg", encode(photo_like(260, 200, 40 + i), "JPEG", quality=95))
    return _pack(root / "src", root / "shards", val_count=4, maxcount=2)


def _cfg(shards: Path, **kw) -> DataConfig:
    base = dict(shards=str(shards), workers=2, shuffle_buffer=16, patches_per_image=4)
    base.update(kw)
    return DataConfig(**base)


def _batches(cfg: DataConfig, **kw) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return list(train_loader(cfg, **{"batch_size": 4, "seed": 0, **kw}))


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_uint8_nchw_the_input_is_the_targets_jpeg_and_its_quality_rides_along(photo_shards, workers):
    cfg = _cfg(photo_shards, workers=workers, jpeg=JpegSpec(quality=(10, 90)))
    batches = _batches(cfg, steps=6)
    assert len(batches) == 6
    qualities = set()
    for inputs, targets, quality in batches:
        assert inputs.shape == targets.shape == (4, 3, 128, 128)
        assert inputs.dtype == targets.dtype == torch.uint8 and quality.dtype == torch.float32 and quality.shape == (4,)
        for x, y, q in zip(inputs, targets, quality):
            y_hwc = np.ascontiguousarray(y.permute(1, 2, 0).numpy())
            # the quality the worker read back from the JPEG's tables is the one it was encoded at
            assert np.array_equal(x.permute(1, 2, 0).numpy(), jpeg.decode(jpeg.encode(y_hwc, int(q)))[0])
            qualities.add(int(q))
    assert len(qualities) > 8


def test_same_seed_reproduces_a_later_start_goes_on_and_seeds_differ(photo_shards):
    cfg = _cfg(photo_shards)
    a, b = _batches(cfg, steps=6), _batches(cfg, steps=6)
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b))
    flat = lambda batches: {t.numpy().tobytes() for _, ts, _ in batches for t in ts}  # noqa: E731
    assert len(flat(a)) == 6 * 4  # no patch twice
    later = _batches(cfg, steps=3, step=3)  # a run resumed at step 3 goes on: it does not replay
    assert all(torch.equal(x[1], y[1]) for x, y in zip(later, a[3:]))
    assert not flat(a) & flat(_batches(cfg, steps=6, seed=1))


@pytest.mark.parametrize("workers", [0, 2])
def test_epochs_continue_through_the_shards(tmp_path, workers):
    """One patch per image: the next epoch takes the images the last one had not reached yet."""
    colours = _flat_images(tmp_path / "src", 30, size=(130, 130))
    shards = _pack(tmp_path / "src", tmp_path / "shards", val_fraction=0.0, maxcount=1)
    cfg = _cfg(shards, patches_per_image=1, shuffle_buffer=1, workers=workers)
    loader = train_loader(cfg, batch_size=1, seed=0, steps=workers or 1)
    seen: dict[int, list] = collections.defaultdict(list)  # stream -> images, in order
    for _ in range(3):
        epoch = [int(t[0, 0].float().mean().round()) for _, t, _ in loader]
        assert len(epoch) == (workers or 1)
        for i, c in enumerate(epoch):
            seen[i].append(c)
    # each stream (15 images at 2 workers, 30 at 0) takes a new image every epoch; a stream that
    # started over each epoch would repeat its first. (At 2 workers each epoch also drops the
    # batches the workers had prefetched: 1 + 4 images per epoch at most here, 15 in all.)
    for images in seen.values():
        assert len(set(images)) == 3
    assert set().union(*map(set, seen.values())) <= set(colours.values())


def test_steps_per_epoch_follows_the_manifest(photo_shards):
    m = load_manifest(photo_shards)
    assert m["splits"]["train"]["samples"] == 6
    cfg = _cfg(photo_shards, patches_per_image=1)  # the seed's epoch: one patch per image
    assert steps_per_epoch(cfg, batch_size=2, world_size=1) == 3
    assert steps_per_epoch(cfg, batch_size=2, world_size=2) == 1
    assert len(train_loader(cfg, batch_size=1, seed=0, world_size=2)) == 3
    cfg = _cfg(photo_shards, patches_per_image=10)  # every image once, 10 patches each
    assert steps_per_epoch(cfg, batch_size=3, world_size=1) == 6 // 3 * 10
    # each slot of the global batch takes its own images: with 8 slots for 6 images, one image each (2 twice)
    assert steps_per_epoch(cfg, batch_size=4, world_size=2) == 10


@pytest.mark.parametrize("n_images, maxcount", [(9, 3), (9, 9)])  # 3 shards, and 1 shard, for 2 ranks x 2 workers
def test_every_rank_gets_the_same_steps_and_an_epoch_takes_each_image_once(tmp_path, n_images, maxcount):
    """One patch an image, a global batch of 2 (2 ranks x 1): an epoch is 9 // 2 = 4 steps, whose 8 slots
    hold 8 different images (the ninth waits for another epoch's order); every image comes in time."""
    colours = _flat_images(tmp_path / "src", n_images)
    shards = _pack(tmp_path / "src", tmp_path / "shards", val_fraction=0.0, maxcount=maxcount)
    assert len(shard_paths(shards, "train")) == -(-n_images // maxcount)
    cfg = _cfg(shards, patches_per_image=1, shuffle_buffer=1)
    seen = {}  # rank -> the images of its steps, in order
    for rank in (0, 1):
        batches = _batches(cfg, batch_size=1, rank=rank, world_size=2, steps=24)
        assert len(batches) == 24
        seen[rank] = [next(k for k, v in colours.items() if abs(v - int(t[0, 0].float().mean().round())) <= 1)
                      for _, t, _ in batches]
    for epoch in range(6):
        images = [seen[rank][step] for rank in (0, 1) for step in range(4 * epoch, 4 * epoch + 4)]
        assert len(set(images)) == 8, (epoch, images)
    assert set(seen[0]) | set(seen[1]) == set(colours)


def test_val_split_is_covered_exactly_once_across_ranks_at_every_quality(photo_shards):
    cfg = _cfg(photo_shards, val_qualities=(10, 50), jpeg=JpegSpec(chroma="random"))
    seen, per_rank = collections.Counter(), []
    for rank in (0, 1):
        per_rank.append(0)
        for inputs, targets, quality, key in val_loader(cfg, rank=rank, world_size=2):
            assert inputs.shape == targets.shape == (1, 3, 200, 256)
            seen[key, int(quality)] += 1
            per_rank[-1] += 1
    assert min(per_rank) >= 2  # shared, not all on one rank
    expected = sorted(key for url in shard_paths(photo_shards, "val")
                      for key in {Path(n).name.split(".")[0] for n in tarfile.open(url).getnames()})
    assert len(expected) == 4 and set(seen.values()) == {1}
    assert sorted(seen) == sorted((k, q) for k in expected for q in (10, 50))
    again = [x for r in (0, 1) for x, _, _, _ in val_loader(cfg, rank=r, world_size=2)]
    first = [x for r in (0, 1) for x, _, _, _ in val_loader(cfg, rank=r, world_size=2)]
    assert all(torch.equal(a, b) for a, b in zip(again, first))


def test_corrupt_members_and_truncated_shards_are_skipped_and_counted(tmp_path, capfd):
    good = [encode(photo_like(200, 180, 60 + i), "JPEG") for i in range(4)]

    def shard(path: Path, samples: list[tuple[str, bytes]], cut: int = 0) -> str:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in samples:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        data = buf.getvalue()
        path.write_bytes(data[: len(data) - cut] if cut else data)
        return str(path)

    urls = [
        shard(tmp_path / "a.tar", [("g0.jpg", good[0]), ("g0.json", b"{}"), ("bad.jpg", b"not a jpeg at all"),
                                   ("bad.json", b"{}"), ("g1.jpg", good[1]), ("nojpg.json", b"{}")]),
        shard(tmp_path / "b.tar", [("g2.jpg", good[2]), ("g2.json", b"{}"), ("g3.jpg", good[3])], cut=len(good[3]) // 2 + 600),
    ]
    cfg = DataConfig(train_urls=" ".join(urls).replace(" ", "::"), epoch_samples=40, workers=0,
                     shuffle_buffer=4, patches_per_image=2)
    batches = _batches(cfg, steps=10)
    assert len(batches) == 10
    err = capfd.readouterr().err
    assert "skipped bad in" in err and "not an image" in err
    assert "skipped nojpg in" in err and "no image member" in err
    assert "skipped so far by rank 0 worker 0" in err
    assert f"skipped shard {urls[1]}: ReadError: unexpected end of data" in err  # the truncated shard, named
    assert "BufferedReader" not in err


def test_url_patterns_and_pipe_commands(photo_shards):
    urls = shard_paths(photo_shards, "train")
    folder = Path(urls[0]).parent
    brace = str(folder / "train-{000000..000002}.tar")
    pipe = "::".join(f"pipe:cat {u}" for u in urls)
    for pattern in (brace, pipe):
        cfg = DataConfig(train_urls=pattern, epoch_samples=8, workers=2, shuffle_buffer=8, patches_per_image=2,
                         allow_pipe=True)
        cfg.validate()
        batches = _batches(cfg)
        assert len(batches) == 2 and batches[0][0].shape == (4, 3, 128, 128)


def test_streams_that_must_share_shards_say_how_often_each_is_read(photo_shards, capfd):
    """From URLs, 3 shards for 2 ranks x 2 workers: every stream reads every shard (keeping its share),
    and one warning says so with the numbers; a shard folder's slots never do (no warning)."""
    urls = "::".join(shard_paths(photo_shards, "train"))
    cfg = DataConfig(train_urls=urls, epoch_samples=8, workers=2, shuffle_buffer=8, patches_per_image=2)
    train_loader(cfg, batch_size=2, seed=0, rank=0, world_size=2)
    err = capfd.readouterr().err
    assert "3 training shard(s) for 4 streams" in err and "each shard is read 4 times an epoch" in err
    train_loader(_cfg(photo_shards), batch_size=2, seed=0, rank=0, world_size=2)
    assert "training shard(s) for" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- URLs that must not be opened

# A config someone else wrote runs no command unasked: webdataset's brace expansion turns `{p,p}ipe:`
# into `pipe:`, and its gopen reads `Pipe:` (any case, after blanks) as a pipe, guarded only by an
# `assert` that `python -O` drops. Checked after expansion, in the config and where a URL is opened.


def _train_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": data, "train": {"out_dir": str(tmp_path / "run")}}))
    return path


PIPE_NOT_ALLOWED = "a pipe: URL runs a shell command on every rank and worker: set data.allow_pipe=true if you mean it"


@pytest.mark.parametrize("pattern, allow_pipe, message", [
    ("{p,p}ipe:touch MARKER", False, PIPE_NOT_ALLOWED),
    ("Pipe:touch MARKER", False, PIPE_NOT_ALLOWED),
    ("Pipe:touch MARKER", True, "'Pipe:' is not a scheme the pipeline reads: plain paths, file:, http:, https: (and pipe: "
                                "with data.allow_pipe=true), written in lower case"),
], ids=["braces", "case", "case-allowed"])
def test_a_config_file_runs_no_command_it_was_not_allowed_to(shards, tmp_path, pattern, allow_pipe, message):
    """launch/train.py's main on a YAML config: one line, exit 2, before any work; the command never ran."""
    from restorer.train.loop import main

    marker = tmp_path / "MARKER"
    config = _train_config(tmp_path, {"shards": str(shards), "train_urls": pattern.replace("MARKER", str(marker)),
                                      "allow_pipe": allow_pipe})
    p = cli_here(main, "--config", config, *TINY, "train.max_steps=2")
    shown = repr(pattern.replace("{p,p}", "p").replace("MARKER", str(marker)))
    assert (p.returncode, p.stderr) == (2, f"restorer train: error: data.train_urls: {shown}: {message}\n")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_an_allowed_pipe_trains(shards, tmp_path):
    from restorer.train.loop import main

    pattern = f"pipe:cat {shards}/train-{{000000..000002}}.tar"  # three shards: braces expand inside a pipe too
    config = _train_config(tmp_path, {"shards": str(shards), "train_urls": pattern, "allow_pipe": True})
    p = cli_here(main, "--config", config, *TINY, "train.max_steps=2", "log.val_every=0")
    assert_ok(p)
    assert [m["step"] for m in metrics(tmp_path / "run") if "loss" in m] == [2] and "warning" not in p.stderr


REFUSED = ["pipe:touch {m}0", "Pipe:touch {m}1", " pipe:touch {m}2", "pi\tpe:touch {m}3", "PIPE:touch {m}4", "ftp://h/x.tar",
           "s3://bucket/x.tar", "hf://x/y.tar"]


def test_urls_are_refused_where_they_are_opened_too(tmp_path, capfd):
    """read_images (what a loader's workers call) refuses what the config would have: a pipe without
    allow_pipe, a pipe's scheme not written `pipe:`, schemes it does not read. Each costs a warning."""
    marker = tmp_path / "MARKER"
    urls = [u.format(m=marker) for u in REFUSED]
    skips = SkipLog("the test"), SkipLog("the test, allow_pipe")
    assert list(read_images(urls, skips[0])) == [] and list(read_images(urls[1:], skips[1], allow_pipe=True)) == []
    assert [skip.count for skip in skips] == [len(urls), len(urls) - 1]
    err = capfd.readouterr().err.splitlines()
    assert err and all("RefusedURL: " in line for line in err), err  # (the first 3 of each are printed)
    assert not list(tmp_path.iterdir())  # no command ran


def test_the_loaders_refuse_a_config_never_validated(tmp_path):
    """A DataConfig built in code (no validate()): the loaders list its URLs, and refuse them, in one line."""
    marker = tmp_path / "MARKER"
    cfg = DataConfig(train_urls=f"{{p,p}}ipe:touch {marker}", val_urls=f"Pipe:touch {marker}", epoch_samples=8, workers=0)
    with pytest.raises(ConfigError, match=f"^data.train_urls: 'pipe:touch {marker}': a pipe: URL runs a shell command"):
        train_loader(cfg, batch_size=4, seed=0)
    with pytest.raises(ConfigError, match=f"^data.val_urls: 'Pipe:touch {marker}': a pipe: URL runs a shell command"):
        list(val_loader(cfg))
    assert not marker.exists()


@pytest.mark.slow
def test_urls_are_refused_where_they_are_opened_under_python_O(tmp_path):
    """`python -O` drops webdataset's assert on `pipe:`: gopen would run `Pipe:touch M` as `touch M`."""
    code = ("import sys; from restorer.train.loader import SkipLog, read_images; skip = SkipLog('the test'); "
            "print(len(list(read_images(sys.argv[1:], skip, allow_pipe=True))), skip.count)")
    urls = [u.format(m=tmp_path / "MARKER") for u in REFUSED[1:5]]
    p = subprocess.run([sys.executable, "-O", "-c", code, *urls], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert (p.returncode, p.stdout) == (0, f"0 {len(urls)}\n") and "RefusedURL: " in p.stderr, p.stderr
    assert not list(tmp_path.iterdir())


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="shards"):
        DataConfig().validate()
    with pytest.raises(ValueError, match="epoch_samples"):
        DataConfig(train_urls="x-{0..1}.tar").validate()
    with pytest.raises(ValueError, match=r"jpeg.quality: must be 2 or more qualities in 1..100, ascending"):
        DataConfig(shards="x", jpeg=JpegSpec(quality=(60, 10))).validate()
    with pytest.raises(ValueError, match=r"quality_weights: must be one weight >= 0 per interval of quality \(2\)"):
        JpegSpec(quality=(10, 60, 95), quality_weights=(1.0,)).validate()
    with pytest.raises(ValueError, match="size: must be a multiple of 8"):
        PatchSpec(size=100).validate()
    with pytest.raises(ValueError, match="val_qualities: must be one or more qualities in 1..100"):
        DataConfig(shards="x", val_qualities=(0,)).validate()
    with pytest.raises(ValueError, match="set data.allow_pipe=true"):
        DataConfig(train_urls="pipe:cat x.tar", epoch_samples=8).validate()
    with pytest.raises(ValueError, match="val_crop: must be >= 16"):
        DataConfig(shards="x", val_crop=8).validate()
    with pytest.raises(ValueError, match="chroma: must be one of 444, 422, 420, random"):
        JpegSpec(chroma="411").validate()
    with pytest.raises(ValueError, match="double_quality: must be"):
        JpegSpec(double_quality=(0, 50)).validate()


# ----------------------------------------------------------------------------- degradations of real photos


def _sampling(jpeg: bytes) -> str:
    """The chroma subsampling written in the JPEG's frame header, read back by Pillow."""
    from PIL import Image, JpegImagePlugin

    return {0: "444", 1: "422", 2: "420"}[JpegImagePlugin.get_sampling(Image.open(io.BytesIO(jpeg)))]


def test_chroma_subsampling_is_what_the_bytes_say():
    image = photo_like(300, 260, 6)
    rng = np.random.default_rng(6)
    pair = lambda spec: training_pair(image, PatchSpec(), spec, rng)[0]  # noqa: E731
    for chroma in ("444", "422", "420"):
        assert {_sampling(pair(JpegSpec(chroma=chroma))) for _ in range(10)} == {chroma}
    drawn = collections.Counter(_sampling(pair(JpegSpec(chroma="random"))) for _ in range(90))
    assert set(drawn) == {"444", "422", "420"} and min(drawn.values()) > 15, drawn


def _grid_phase(image: np.ndarray) -> tuple[int, int]:
    """Where the 8x8 block edges of a JPEG lie: the (row, column) phase with the largest jumps
    between neighbouring rows / columns (a blocky image jumps at its block edges)."""
    gray = image.astype(np.float64).mean(axis=2)
    phases = []
    for axis in (0, 1):
        jumps = np.abs(np.diff(gray, axis=axis)).mean(axis=1 - axis)  # jumps[i]: between lines i and i + 1
        phases.append(int(np.argmax([jumps[k::8].mean() for k in range(8)])))
    return phases[0], phases[1]


def test_double_jpeg_shifts_the_first_block_grid():
    image = photo_like(400, 400, 7)
    rng = np.random.default_rng(7)
    pair = lambda spec: training_pair(image, PatchSpec(), spec, rng)  # noqa: E731
    pixels = lambda spec: jpeg.decode(pair(spec)[0])[0]  # noqa: E731
    once = JpegSpec(quality=(5, 5))
    # the last JPEG nearly lossless: what shows is the first one's grid
    twice = JpegSpec(quality=(98, 98), double_p=1.0, double_quality=(5, 5))
    assert {_grid_phase(pixels(once)) for _ in range(20)} == {(7, 7)}
    phases = [_grid_phase(pixels(twice)) for _ in range(200)]
    for axis in (0, 1):  # shifts 0-7 both ways, about uniform, and independent
        counts = collections.Counter(p[axis] for p in phases)
        assert len(counts) == 8 and min(counts.values()) >= 10, counts
    assert len(set(phases)) > 30
    data, target = pair(twice)
    decoded, read_back = jpeg.decode(data)
    assert target.shape == (128, 128, 3) and decoded.shape == (128, 128, 3)
    assert psnr(decoded, target) < 32  # the first, coarse JPEG is in the input ...
    assert read_back == 98  # ... but its file's tables are the last JPEG's, as in a user's file
    # nearly lossless both times (4:4:4, q98): the input matches its target as closely as one such JPEG
    # does (a 42.9 dB here; one pixel of misalignment would be ~20 dB): the target is cut at the same shift
    fine = JpegSpec(quality=(98, 98), double_p=1.0, double_quality=(98, 98), chroma="444")
    for _ in range(10):
        data, target = pair(fine)
        assert psnr(jpeg.decode(data)[0], target) > 38


def _seed_draws(rng: np.random.Generator, spec: PatchSpec, h: int, w: int) -> None:
    """The random numbers the seed's patch distribution draws, in order, and nothing else."""
    scale = float(rng.choice(spec.scales)) if rng.random() < spec.rescale_p else 1.0
    if min(spec.size / scale, h, w) == spec.size:
        rng.integers(0, h - spec.size + 1), rng.integers(0, w - spec.size + 1)
    else:
        rng.random(), rng.random()
    if rng.random() < spec.rotate_p:
        rng.choice(spec.rotations)


def test_the_defaults_draw_exactly_the_seeds_random_numbers():
    image = photo_like(300, 200, 8)
    for seed in range(40):
        ours, seeds = np.random.default_rng(seed), np.random.default_rng(seed)
        training_pair(image, PatchSpec(), JpegSpec(), ours)
        _seed_draws(seeds, PatchSpec(), 200, 300)
        assert ours.bit_generator.state == seeds.bit_generator.state, seed


def test_gray_pairs_are_grayscale_jpegs_of_the_luma_with_the_luma_in_every_plane():
    image = photo_like(300, 300, 9)
    rng = np.random.default_rng(9)
    spec = JpegSpec(quality=(10, 10), gray_p=0.5, double_p=0.5)
    kinds = collections.Counter()
    for _ in range(60):
        data, target = training_pair(image, PatchSpec(), spec, rng)
        decoded, quality = jpeg.decode(data)
        assert target.shape == (128, 128, 3) and quality == 10
        kinds[decoded.shape[-1]] += 1
        if decoded.shape[-1] == 1:  # a grayscale file; the target its luma, three times
            assert (target == target[..., :1]).all()
            assert 25 < psnr(np.repeat(decoded, 3, axis=-1), target) < 40
        else:
            assert not (target == target[..., :1]).all()
    assert min(kinds[1], kinds[3]) > 15, kinds
    # a one-plane network's pairs stay one plane (gray_p 0 draws no number: the seed's draws test)
    gray = PatchSpec(grayscale=True)
    assert training_pair(image, gray, spec, np.random.default_rng(1))[1].shape == (128, 128, 1)
