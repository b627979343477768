"""restorer.models: the seed network layer for layer, the field's networks at the papers' sizes, and
what every network must do (any size, grayscale, identity at start, bf16/channels_last, tiling)."""

from __future__ import annotations

import io
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from helpers import save_network, save_state
from restorer.formats.checkpoint import CheckpointError
from restorer.formats.config import ConfigError, load_config
from restorer.infer.inference import load_checkpoint_network, restore_array
from restorer.models import (CONDITIONING, MODELS, DnCNN, NAFNet, SeedNet, UNet, build_model, count_parameters,
                             describe, load_weights, macs_per_pixel)

# small options so every network runs in milliseconds
TINY = {"seed": {"residual": True}, "dncnn": {"depth": 4, "channels": 8},
        "unet": {"widths": [4, 8, 8, 16], "blocks": 1},
        "nafnet": {"width": 4, "enc_blocks": [1, 1], "middle_blocks": 1, "dec_blocks": [1, 1]}}


def is_nafnet_scale(name: str) -> bool:
    """NAFNet's per-channel scales: each block's beta and gamma, its LayerNorms' weight and bias."""
    return name.endswith(("beta", "gamma")) or ".norm" in name


def _perturbed(name: str, in_channels: int = 3, std: float = 0.05, **options) -> nn.Module:
    """A network whose output layer is random: clearly not the identity it starts as."""
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, **TINY[name], **options)
    last = {"seed": lambda m: m.last, "dncnn": lambda m: m.body[-1], "unet": lambda m: m.tail,
            "nafnet": lambda m: m.ending}[name](model)
    with torch.no_grad():
        last.weight.normal_(0, std)
        if name == "nafnet":  # the blocks' branches start at zero too
            for n, p in model.named_parameters():
                if is_nafnet_scale(n):
                    p.normal_(0, 0.5)
    return model.eval()


# ----------------------------------------------------------------------------- the seed, exactly


def test_seed_is_the_documents_layer_list():
    model = SeedNet()
    layers = [(type(m).__name__, m.in_channels, m.out_channels, m.kernel_size[0], m.padding[0])
              if isinstance(m, nn.Conv2d) else (type(m).__name__, m.num_parameters) for m in model.base]
    unit = lambda a, b: [("Conv2d", a, b, 3, 1), ("Conv2d", b, b, 1, 0), ("PReLU", 1),  # noqa: E731
                         ("Conv2d", b, b, 3, 1), ("PReLU", 1)]
    assert layers == [*unit(3, 128), *unit(128, 64), *unit(64, 32), ("Conv2d", 32, 16, 1, 0), ("PReLU", 1)]
    last = model.last
    assert isinstance(last, nn.Conv2d) and (last.in_channels, last.out_channels, last.kernel_size, last.padding) == (
        16, 3, (5, 5), (2, 2))
    assert [name for name, _ in model.named_children()] == ["base", "last"]
    assert count_parameters(model) == 313_066
    assert count_parameters(model.base) + count_parameters(model.last) == 313_066
    # grayscale: the first layer takes 1 channel, the last gives 1 (weights and bias)
    assert count_parameters(SeedNet(1)) == 313_066 - 2 * 128 * 9 - (2 * 16 * 25 + 2)


def test_seed_starts_near_the_identity_with_its_residual_and_near_zero_without():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        res, plain = SeedNet(residual=True)(x), SeedNet(residual=False)(x)
    assert (res - x).abs().mean() < 0.05 and plain.abs().mean() < 0.1  # images are ~0.5


def test_a_checkpoint_of_the_old_seed_layout_is_refused_in_one_line(tmp_path):
    old = {"base.0.weight": torch.zeros(32, 3, 3, 3), "base.0.bias": torch.zeros(32), "last.weight": torch.zeros(3, 32, 5, 5)}
    path = save_state(tmp_path / "old.pt", {"model": old, "model_name": "seed",
                                            "model_args": {"in_channels": 3, "residual": True}})
    with pytest.raises(CheckpointError, match="old.pt: it holds the seed network's old layout") as info:
        load_checkpoint_network(path)
    assert "\n" not in str(info.value)


def test_weights_of_another_shape_are_one_line():
    with pytest.raises(ValueError, match="do not fit UNet: .*of another shape") as info:
        load_weights(UNet(), UNet(widths=[8, 16, 32, 64]).state_dict(), "x.pt")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- the papers' sizes


def test_dncnn3_has_the_papers_layers():
    # DnCNN-3 (gray): conv 1->64 + bias, 18 x (conv 64->64 without bias + BN), conv 64->1
    model = DnCNN(1, **DnCNN.PRESETS["gpu"])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 18
    assert count_parameters(model) == (9 * 64 + 64) + 18 * (9 * 64 * 64 + 2 * 64) + 9 * 64 == 667_072


def test_unet_gpu_preset_is_drunet():
    # DRUNet (Zhang et al. 2021) has 32,640,960 parameters with its 4-channel input (image + noise
    # level map); ours takes the image alone: 64 x 3 x 3 fewer in the head
    model = UNet(3, **UNet.PRESETS["gpu"])
    assert count_parameters(model) == 32_640_960 - 64 * 9
    assert [m.kernel_size for m in model.modules() if isinstance(m, nn.ConvTranspose2d)] == [(2, 2)] * 3


@pytest.mark.slow
def test_nafnet_gpu_preset_is_the_papers_width32_and_width64_models():
    # the authors: "29.16M parameters in NAFNet-width32 for the denoising task" (SIDD config);
    # width 64: 115.9 M parameters and 65 GMACs at 256 x 256 (the paper's Table for SIDD)
    assert round(count_parameters(NAFNet(3, **NAFNet.PRESETS["gpu"])) / 1e4) == 2916
    with torch.device("meta"):
        wide = NAFNet(3, **{**NAFNet.PRESETS["gpu"], "width": 64})
    assert 115.9e6 <= count_parameters(wide) < 116.0e6  # ptflops printed "115.9" (it truncates)
    # (their tool, ptflops, also counts bias additions and pooling: ~2% more than the convolutions alone)
    assert macs_per_pixel(wide, 3) * 256 * 256 / 1e9 == pytest.approx(65, rel=0.03)


def test_nafnet_scales_are_channel_vectors_and_a_checkpoint_of_1xCx1x1_scales_still_restores(tmp_path):
    """torch 2.11's compiled backward on CUDA returned C-vector gradients for 1 x C x 1 x 1 parameters
    and failed gpu.yaml's first step (bench/gpu_check.py on an H200): the scales are C-vectors now, and
    a checkpoint written before (its weights and its EMA in the old layout) restores the same image."""
    model = _perturbed("nafnet", conditioning="decoder")
    scales = {k for k in model.state_dict() if is_nafnet_scale(k)}
    assert len(scales) > 8 and all(model.state_dict()[k].dim() == 1 for k in scales)
    earlier = {k: (v.view(1, -1, 1, 1) if k in scales else v) for k, v in model.state_dict().items()}
    path = tmp_path / "old.pt"
    old = types.SimpleNamespace(state_dict=lambda: earlier)  # what the trainer wrote then
    save_network(path, old, "nafnet", {**TINY["nafnet"], "conditioning": "decoder"}, ema=earlier)
    image = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    loaded, _ = load_checkpoint_network(path)
    assert np.array_equal(restore_array(loaded, image, quality=30), restore_array(model, image, quality=30))
    out = model(torch.rand(1, 3, 40, 40), torch.tensor([30.0]))  # each scale's gradient has its shape
    out.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters() if p.dim() == 1)


# ----------------------------------------------------------------------------- every network


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels", [3, 1])
def test_any_size_in_and_out_for_rgb_and_grayscale(name, channels):
    model = _perturbed(name, channels)
    for h, w in ((37, 53), (8, 8), (5, 3), (64, 48)):
        x = torch.rand(2, channels, h, w)
        with torch.no_grad():
            assert model(x).shape == x.shape


def test_padding_replicates_the_edges_and_the_u_nets_crop_back_exactly():
    from restorer.models.common import pad_to_multiple

    x = torch.rand(1, 2, 5, 11)
    padded = pad_to_multiple(x, 8)
    assert padded.shape == (1, 2, 8, 16) and torch.equal(padded[..., :5, :11], x)
    assert torch.equal(padded[..., 5:, :11], x[..., 4:5, :].expand(1, 2, 3, 11))  # the last row, repeated
    assert torch.equal(padded[..., :5, 11:], x[..., :, 10:11].expand(1, 2, 5, 5))
    assert pad_to_multiple(torch.rand(1, 1, 16, 8), 8).shape == (1, 1, 16, 8)
    for name in ("unet", "nafnet"):
        model = _perturbed(name)
        x = torch.rand(1, 3, 21, 35)
        with torch.no_grad():  # the output is the network on the padded image, cropped: nothing else
            assert torch.allclose(model(x), model(pad_to_multiple(x, model.multiple))[..., :21, :35], atol=1e-6)


@pytest.mark.parametrize("name", ["dncnn", "unet", "nafnet"])
def test_networks_with_a_global_residual_start_as_the_identity(name):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 45, 61)
    model = build_model(name, **TINY[name]).eval()
    with torch.no_grad():
        assert torch.equal(model(x), x)
    model.train()  # batch norm in training mode too
    assert torch.equal(model(x), x)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_and_channels_last_train_and_agree_with_fp32(name):
    model = _perturbed(name).train()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    cl = model.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cl(x.contiguous(memory_format=torch.channels_last))
    out.float().square().mean().backward()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.02  # bf16 keeps ~3 significant digits
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_network_compiles(name):
    """train.compile: Dynamo captures every network whole (no graph break), conditioned as the blind
    presets train them, through AOT autograd. cpu.yaml's U-Net also goes through Inductor's C++ code
    generation, as the trainer's torch.compile does on a CPU; the others stop before it (Inductor's
    build is most of a compile's time here, and a GPU, where train.compile=true compiles NAFNet, generates
    Triton instead)."""
    backend = "inductor" if name == "unet" else "aot_eager"
    conditioned = name != "seed"  # as the blind presets train them
    model = _perturbed(name, **({"conditioning": "decoder"} if conditioned else {}))
    x, q = torch.rand(1, 3, 40, 40), (torch.tensor([30.0]) if conditioned else None)
    with torch.no_grad():
        assert torch.allclose(torch.compile(model, backend=backend, fullgraph=True)(x, q), model(x, q), atol=1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiled_restore_matches_the_whole_image_and_the_checkpoint_rebuilds_it(name, tmp_path):
    # perturbed enough to change the image by far more than the bound below (DnCNN's output layer
    # sees small features: it needs a larger perturbation to matter)
    model = _perturbed(name, std=0.3 if name == "dncnn" else 0.02)
    path = tmp_path / "net.pt"
    save_network(path, model, name, TINY[name])
    rebuilt, checkpoint = load_checkpoint_network(path)
    assert not checkpoint.network.grayscale and type(rebuilt) is MODELS[name]
    rng = np.random.default_rng(0)
    image = (rng.random((100, 140, 3)) * 255).astype(np.uint8)
    whole = restore_array(rebuilt, image, tile=256, overlap=0)
    tiled = restore_array(rebuilt, image, tile=64, overlap=32)
    assert np.abs(whole.astype(int) - image).max() >= 20 and np.abs(whole.astype(int) - image).mean() >= 5
    diff = np.abs(whole.astype(int) - tiled)
    assert diff.max() <= 2 and diff.mean() < 0.1, (diff.max(), diff.mean())


def test_describe_names_the_network_its_parameters_and_macs():
    line = describe(UNet(), "unet")
    assert line.startswith("unet (widths=[16, 32, 64, 128], blocks=1, conditioning=none, correction=steps; RGB): 575,328 parameters,")
    line = describe(UNet(conditioning="decoder"), "unet")  # the quality embedding and a FiLM per decoder scale
    assert "conditioning=decoder" in line and "594,176 parameters, 36.2 k MACs" in line
    assert line.endswith("k MACs per pixel")
    assert macs_per_pixel(SeedNet(), 3) == count_parameters(SeedNet()) - 7 - 128 * 3 - 64 * 3 - 32 * 3 - 16 - 3


# ----------------------------------------------------------------------------- building by name and config


def test_build_model_by_name_and_its_errors():
    assert isinstance(build_model("nafnet", width=8), NAFNet)
    with pytest.raises(ValueError, match="unknown model 'unet2'; choose from: dncnn, nafnet, seed, unet"):
        build_model("unet2")
    with pytest.raises(ValueError, match=r"bad argument for model 'unet'.*'depth'") as info:
        build_model("unet", depth=5)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("dncnn", in_channels=0)


def test_presets_fill_the_section_and_explicit_keys_win():
    cfg = load_config(None, ["data.shards=x", "model.name=unet", "model.preset=gpu"])
    assert cfg.model.unet.widths == (64, 128, 256, 512) and cfg.model.unet.blocks == 4
    cfg = load_config(None, ["data.shards=x", "model.name=unet", "model.preset=gpu", "model.unet.blocks=2"])
    assert cfg.model.unet.widths == (64, 128, 256, 512) and cfg.model.unet.blocks == 2
    assert cfg.model.options() == {"widths": [64, 128, 256, 512], "blocks": 2, "conditioning": "none",
                                   "correction": "steps"}
    assert load_config(None, ["data.shards=x", "model.preset=cpu"]).model.seed.residual is True
    assert load_config(None, ["data.shards=x", "model.preset=cpu", "model.seed.residual=false"]).model.seed.residual is False
    for overrides, message in ((["model.name=unet", "model.preset=huge"], "model.preset: unet has no preset 'huge'"),
                               (["model.name=nafnet", "model.nafnet.width=7"], "model.nafnet.width: must be a positive even"),
                               (["model.unet.depth=3"], "unknown key model.unet.depth")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_config(None, ["data.shards=x", *overrides])


# ----------------------------------------------------------------------------- conditioned on the JPEG quality


def _conditioned(name: str, conditioning: str) -> nn.Module:
    """A tiny conditioned network whose output and modulation are random (not the start's identity)."""
    torch.manual_seed(1)
    model = _perturbed(name) if conditioning == "none" else build_model(name, **TINY[name], conditioning=conditioning)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "film" in n or "cond" in n or n in ("tail.weight", "ending.weight", "body.11.weight", "last.weight"):
                p.normal_(0, 0.2)
            elif name == "nafnet" and is_nafnet_scale(n):
                p.normal_(0, 0.5)
            elif name == "dncnn" and n == f"body.{len(model.body) - 1}.weight":
                p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("name", ["dncnn", "unet", "nafnet"])
@pytest.mark.parametrize("conditioning", CONDITIONING[1:])
def test_conditioned_networks_take_the_quality_start_as_the_identity_and_script(name, conditioning):
    fresh = build_model(name, **TINY[name], conditioning=conditioning)
    assert fresh.takes_quality
    x = torch.rand(2, 3, 37, 45)
    q = torch.tensor([10.0, 90.0])
    with torch.no_grad():
        assert torch.equal(fresh(x, q), x)  # the identity at start, as unconditioned
        model = _conditioned(name, conditioning)
        low, high = model(x, torch.tensor([10.0, 10.0])), model(x, torch.tensor([90.0, 90.0]))
        assert (low - high).abs().max() > 1e-3  # the quality changes the output ...
        both = model(x, q)
        assert torch.allclose(both[0], low[0], atol=1e-5) and torch.allclose(both[1], high[1], atol=1e-5)  # ... per image
        scripted = torch.jit.script(model)
        assert torch.allclose(scripted(x, q), both, atol=1e-5)
    with pytest.raises(ValueError, match="conditioned on the JPEG quality"):
        model(x)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_unconditioned_networks_keep_their_layers_and_ignore_the_quality(name):
    model = _perturbed(name)
    assert not model.takes_quality
    assert not [k for k in model.state_dict() if "film" in k or k.startswith("cond.")]
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x, torch.tensor([55.0])))


def test_conditioning_is_checked_and_the_seed_takes_only_an_input_plane():
    with pytest.raises(ValueError, match="conditioning: must be one of none, input, decoder, scales, got 'film'"):
        UNet(conditioning="film")
    with pytest.raises(ValueError, match="conditioning: must be one of none, input"):
        SeedNet(conditioning="decoder")
    seed = SeedNet(conditioning="input")
    assert seed.base[0].in_channels == 4 and count_parameters(seed) == 313_066 + 128 * 9
    with pytest.raises(ConfigError, match="model.unet.conditioning: must be one of"):
        load_config(None, ["data.shards=x", "model.name=unet", "model.unet.conditioning=sideways"])


@pytest.mark.parametrize("name", ["dncnn", "unet", "nafnet"])
def test_a_conditioned_networks_correction_is_in_its_inputs_quantization_steps(name):
    steps = _conditioned(name, "decoder")
    plain = build_model(name, **TINY[name], conditioning="decoder", correction="plain").eval()
    plain.load_state_dict(steps.state_dict())  # the same weights: only the correction's unit differs
    x = torch.rand(3, 3, 33, 41)
    q = torch.tensor([10.0, 50.0, 95.0])
    with torch.no_grad():
        ratio = ((steps(x, q) - x).flatten(1).norm(dim=1) / (plain(x, q) - x).flatten(1).norm(dim=1)).tolist()
        assert ratio == pytest.approx([1.0, 0.294, 0.029], abs=2e-3)  # libjpeg's mean luma steps over q10's
        assert torch.equal(torch.jit.script(steps)(x, q), steps(x, q))


def test_the_quantization_steps_are_the_tables_libjpeg_writes():
    """quantization_steps() against the mean of the luma table Pillow (libjpeg-turbo) writes at q."""
    from restorer.models.common import quantization_steps

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))

    def mean_step(q: int) -> float:
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=q)
        return float(np.mean(Image.open(buf).quantization[0]))

    steps = quantization_steps()
    for q in (1, 5, 10, 20, 30, 50, 70, 80, 90, 95, 100):
        assert steps[q - 1].item() == pytest.approx(mean_step(q) / mean_step(10), rel=1e-6), q


def test_a_resume_of_nafnet_with_1xCx1x1_scales_and_their_adam_moments_goes_on():
    """The optimizer's moments of an earlier checkpoint are in the old layout too: a resume reshapes them."""
    from restorer.train.loop import Training

    overrides = ["model.name=nafnet", "model.nafnet.conditioning=decoder", "optim.name=adamw"] + \
        [f"model.nafnet.{k}={json.dumps(v)}" for k, v in TINY["nafnet"].items()]
    cfg = load_config("configs/cpu.yaml", overrides)
    before = Training.build(cfg, torch.device("cpu"))
    before.model(torch.rand(1, 3, 16, 16), torch.tensor([30.0])).sum().backward()
    before.optimizer.step()
    state = before.state_dict()
    name_of = {id(p): n for n, p in before.model.named_parameters()}
    order = [name_of[id(p)] for g in before.optimizer.param_groups for p in g["params"]]  # the state's indices
    old = lambda k, v: v.view(1, -1, 1, 1) if is_nafnet_scale(k) else v  # noqa: E731
    state["model"] = {k: old(k, v) for k, v in state["model"].items()}
    for i, moments in state["optimizer"]["state"].items():
        moments.update({m: old(order[i], v) for m, v in moments.items() if m != "step"})
    assert state["optimizer"]["state"][order.index("encoders.0.0.beta")]["exp_avg"].dim() == 4
    after = Training.build(cfg, torch.device("cpu"))
    after.load_state_dict(state)
    after.model(torch.rand(1, 3, 16, 16), torch.tensor([30.0])).sum().backward()
    after.optimizer.step()  # a moment of another shape would not broadcast here
    assert all(v.shape == p.shape for p, m in after.optimizer.state.items() for k, v in m.items() if k != "step")
