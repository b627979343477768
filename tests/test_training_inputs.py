"""What the trainer feeds the network and the optimizer, seen from inside: each batch's JPEG qualities
reach a conditioned network in training and in validation, and the output layer keeps its own lr."""

from __future__ import annotations

import pytest
import torch

from helpers import REPO, TINY
from restorer.cluster import dist
from restorer.formats.config import load_config
from restorer.train.optim import lr_multiplier, make_optimizer, set_lr
from restorer.train.stop import StopRequest
from restorer.train.loop import Training, train_step, validate


def _config(shards=None, *overrides: str):
    return load_config(str(REPO / "configs" / "cpu.yaml"),
                       [*TINY, *([f"data.shards={shards}"] if shards else []), *overrides])


def _qualities_seen(model: torch.nn.Module) -> list[list[float]]:
    """Every call's quality input, as the network received it."""
    seen: list[list[float]] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[1].flatten().tolist()))
    return seen


def test_each_training_batch_reaches_the_network_with_its_own_qualities():
    cfg = _config(None, "train.grad_accum=2")
    assert cfg.network().takes_quality  # cpu.yaml's U-Net is conditioned on the quality
    t = Training.build(cfg, torch.device("cpu"))
    seen = _qualities_seen(t.model)
    g = torch.Generator().manual_seed(0)
    pixels = lambda: torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)  # noqa: E731
    batches = [(pixels(), pixels(), torch.tensor([10.0, 37.0, 95.0])),
               (pixels(), pixels(), torch.tensor([60.0, 12.0, 80.0]))]
    train_step(t, batches)
    assert seen == [[10.0, 37.0, 95.0], [60.0, 12.0, 80.0]]


def test_each_validation_image_reaches_the_network_with_the_quality_it_was_compressed_at(shards):
    cfg = _config(shards, "data.val_qualities=[10,30,90]")
    t = Training.build(cfg, torch.device("cpu"))
    seen = _qualities_seen(t.model)
    stop = StopRequest(cfg.train.stop_grace_s)
    try:
        result = validate(t.model, cfg, dist.DistInfo(0, 1, 0, torch.device("cpu")), stop)
    finally:
        stop.restore()
    images = result.metrics["val_images"]
    assert images == 2
    qualities = sorted(q for call in seen for q in call)
    assert qualities == sorted([10.0, 30.0, 90.0] * images)
    # and each quality's JPEG is what it says: the higher, the nearer the original
    assert result.metrics["val_psnr_jpeg_q10"] < result.metrics["val_psnr_jpeg_q30"] < result.metrics["val_psnr_jpeg_q90"]


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_the_output_layer_keeps_its_lr_scale_at_every_step(schedule):
    cfg = _config(None, f"optim.schedule={schedule}", "optim.warmup_steps=3", "optim.last_lr_scale=0.25",
                  "optim.step_every=4", "train.max_steps=20")
    model = cfg.network().build()
    optimizer = make_optimizer(model, cfg.optim, torch.device("cpu"))
    rest, last = optimizer.param_groups
    assert {id(p) for p in last["params"]} == {id(p) for p in model.last_layer().parameters()}
    for step in range(20):
        lr = set_lr(optimizer, cfg, step, step / 20)
        assert lr == rest["lr"] == pytest.approx(cfg.optim.lr * lr_multiplier(cfg.optim, step, step / 20))
        assert last["lr"] == pytest.approx(0.25 * rest["lr"])
