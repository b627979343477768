"""Tests for restorer.infer.metrics against values computed independently here, in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from restorer.infer.metrics import blocking_effect_factor, psnr, psnr_b, ssim

# --------------------------------------------------------------------------- numpy references


def np_gaussian_filter_valid(img: np.ndarray, size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """'valid' correlation of a 2-D image with a normalised size x size Gaussian (no scipy)."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    g /= g.sum()
    kernel = np.outer(g, g)
    windows = np.lib.stride_tricks.sliding_window_view(img, (size, size))
    return np.einsum("ijkl,kl->ij", windows, kernel)


def np_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Wang et al.'s SSIM of one C x H x W image pair, per channel then averaged."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for xc, yc in zip(x.astype(np.float64), y.astype(np.float64)):
        mx, my = np_gaussian_filter_valid(xc), np_gaussian_filter_valid(yc)
        vx = np_gaussian_filter_valid(xc * xc) - mx * mx
        vy = np_gaussian_filter_valid(yc * yc) - my * my
        cxy = np_gaussian_filter_valid(xc * yc) - mx * my
        m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        values.append(m.mean())
    return float(np.mean(values))


def np_bef(x: np.ndarray, block: int = 8) -> float:
    """BEF of one H x W channel, pair by pair as the paper's sets H, H^c, V, V^c define it."""
    h, w = x.shape
    x = x.astype(np.float64)
    boundary, other = [], []
    for i in range(h):
        for j in range(w - 1):  # horizontal neighbours (i, j) - (i, j+1)
            d = (x[i, j] - x[i, j + 1]) ** 2
            (boundary if (j + 1) % block == 0 else other).append(d)
    for i in range(h - 1):
        for j in range(w):  # vertical neighbours (i, j) - (i+1, j)
            d = (x[i, j] - x[i + 1, j]) ** 2
            (boundary if (i + 1) % block == 0 else other).append(d)
    d_b, d_bc = np.mean(boundary), np.mean(other)
    eta = math.log2(block) / math.log2(min(h, w))
    return eta * (d_b - d_bc) if d_b > d_bc else 0.0


def np_psnr_b(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """PSNR-B of one C x H x W pair: MSE and BEF averaged over channels, then the log."""
    mse_b = np.mean([np.mean((xc - yc) ** 2) + np_bef(xc) for xc, yc in zip(x, y)])
    return 10 * math.log10(data_range**2 / mse_b)


def smooth_image(n: int = 1, c: int = 3, h: int = 48, w: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth, photo-like content in [0.1, 0.9]: a sum of low-frequency sinusoids."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros((n, c, h, w))
    for i in range(n):
        for ch in range(c):
            fx, fy, ph = rng.uniform(0.02, 0.09), rng.uniform(0.02, 0.09), rng.uniform(0, 6.3)
            out[i, ch] = 0.5 + 0.3 * np.sin(fx * xx * 2 * np.pi / 3 + fy * yy + ph) * np.cos(fy * xx / 2 + ph)
    return torch.from_numpy(out).clamp(0.1, 0.9)


def add_block_offsets(img: torch.Tensor, amplitude: float = 0.05, block: int = 8, seed: int = 1) -> torch.Tensor:
    """Artificial JPEG-like blocking: one random constant offset per 8x8 block and channel."""
    n, c, h, w = img.shape
    gen = torch.Generator().manual_seed(seed)
    offsets = (torch.rand(n, c, -(-h // block), -(-w // block), generator=gen, dtype=img.dtype) * 2 - 1) * amplitude
    full = offsets.repeat_interleave(block, 2).repeat_interleave(block, 3)[..., :h, :w]
    return img + full


# --------------------------------------------------------------------------- PSNR


def test_psnr_known_constant_error():
    y = torch.full((2, 3, 16, 16), 0.5)
    x = y + 0.1  # mse = 0.01 -> 20 dB
    out = psnr(x, y)
    assert out.shape == (2,)
    assert torch.allclose(out, torch.full((2,), 20.0), atol=1e-4)
    # data_range scales the peak: the same error on a 0..255 scale is still 20 dB
    assert torch.allclose(psnr(x * 255, y * 255, data_range=255.0), torch.full((2,), 20.0), atol=1e-4)


def test_psnr_per_image_matches_numpy():
    rng = np.random.default_rng(3)
    y = rng.random((4, 3, 20, 24))
    x = np.clip(y + rng.normal(0, [[[[0.01]]], [[[0.03]]], [[[0.1]]], [[[0.2]]]], y.shape), 0, 1)
    want = [10 * math.log10(1 / np.mean((xi - yi) ** 2)) for xi, yi in zip(x, y)]
    got = psnr(torch.from_numpy(x), torch.from_numpy(y))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9)


def test_psnr_identical_images_is_finite():
    x = torch.rand(2, 3, 8, 8)
    out = psnr(x, x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, torch.full((2,), 100.0))


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match="N x C x H x W"):
        ssim(torch.rand(3, 16, 16), torch.rand(3, 16, 16))


# --------------------------------------------------------------------------- SSIM


def test_ssim_identical_is_one():
    x = torch.rand(3, 3, 32, 40)
    out = ssim(x, x)
    assert out.shape == (3,)
    assert torch.allclose(out, torch.ones(3), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ssim_shifted_copy_matches_numpy(dtype):
    base = torch.rand(1, 3, 41, 50, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    base = 0.5 * base + 0.5 * smooth_image(1, 3, 41, 50)  # texture plus structure
    x = base[..., :, :-1]
    y = base[..., :, 1:]  # the same picture one pixel to the side
    got = ssim(x.to(dtype), y.to(dtype))
    want = np_ssim(x[0].numpy(), y[0].numpy())
    assert got.dtype == dtype
    assert got.item() < 0.99
    assert abs(got.item() - want) < 1e-5


def test_ssim_data_range_255_matches_numpy():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 256, (2, 1, 24, 30)).astype(np.float64)
    x = np.clip(y + rng.normal(0, 20, y.shape), 0, 255)
    got = ssim(torch.from_numpy(x), torch.from_numpy(y), data_range=255.0)
    want = [np_ssim(xi, yi, data_range=255.0) for xi, yi in zip(x, y)]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9)


def test_ssim_is_symmetric():
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    y = (x + 0.1 * torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert torch.allclose(ssim(x, y), ssim(y, x), atol=1e-7)


def test_ssim_single_channel_and_batch_shape():
    x = torch.rand(5, 1, 16, 16)
    y = (x + 0.05).clamp(0, 1)
    out = ssim(x, y)
    assert out.shape == (5,)
    assert ((out > 0) & (out < 1)).all()
    for i in range(5):  # each image is scored on its own
        assert torch.allclose(ssim(x[i : i + 1], y[i : i + 1]), out[i : i + 1], atol=1e-6)


def test_ssim_too_small_is_refused():
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.rand(1, 1, 10, 32), torch.rand(1, 1, 10, 32))


# --------------------------------------------------------------------------- PSNR-B


def test_psnr_b_penalises_blocking():
    y = smooth_image(2, 3, 48, 64)
    x = add_block_offsets(y)  # blocky test image
    pb, p = psnr_b(x, y), psnr(x, y)
    assert pb.shape == (2,)
    assert (blocking_effect_factor(x) > 0).all()
    assert (pb < p - 0.5).all()  # a clear penalty, not rounding
    for i in range(2):
        assert abs(pb[i].item() - np_psnr_b(x[i].numpy(), y[i].numpy())) < 1e-9


def test_psnr_b_equals_psnr_without_blocking():
    # BEF looks at the test image x alone, so x must have no block structure while the error
    # may have some: x is a ramp (every neighbour difference is 1/128, exactly, in binary)
    # and the reference y is blocky, so the error x - y is blocky too.
    i, j = torch.meshgrid(torch.arange(48.0), torch.arange(64.0), indexing="ij")
    x = ((i + j + 8) / 128).expand(2, 3, 48, 64).double()
    y = add_block_offsets(x, seed=2)
    assert (blocking_effect_factor(x) == 0).all()
    assert (blocking_effect_factor(y) > 0).all()
    assert torch.equal(psnr_b(x, y), psnr(x, y))
    assert (psnr_b(y, x) < psnr(y, x)).all()  # the other way round, the blocky image is tested

    # smoother across the boundaries than inside the blocks: D_B < D_B^c, BEF is clipped to 0
    pattern = torch.tensor([0.0, 1, 2, 3, 3, 2, 1, 0], dtype=torch.float64) / 10
    x = (0.3 + pattern.repeat(5)).expand(1, 1, 40, 40)
    ref = torch.rand(1, 1, 40, 40, dtype=torch.float64)
    assert (blocking_effect_factor(x) == 0).all()
    assert torch.equal(psnr_b(x, ref), psnr(x, ref))
    # a flat test image: no neighbour differences at all
    flat = torch.full((1, 1, 32, 32), 0.5, dtype=torch.float64)
    assert torch.equal(psnr_b(flat, ref[..., :32, :32]), psnr(flat, ref[..., :32, :32]))


def test_psnr_b_matches_numpy_on_random_images():
    rng = np.random.default_rng(11)
    for shape in [(1, 40, 40), (3, 37, 53), (1, 16, 9)]:  # sides that are not multiples of 8 too
        y = rng.random(shape)
        x = np.clip(y + rng.normal(0, 0.05, shape), 0, 1)
        x[:, ::8, :] += 0.05  # some row structure on the grid (and off it for odd sizes)
        got = psnr_b(torch.from_numpy(x)[None], torch.from_numpy(y)[None]).item()
        assert abs(got - np_psnr_b(x, y)) < 1e-9, shape


def test_psnr_b_single_channel_float32():
    y = smooth_image(3, 1, 32, 32).float()
    x = add_block_offsets(y)
    pb = psnr_b(x, y)
    assert pb.shape == (3,) and pb.dtype == torch.float32
    assert (pb <= psnr(x, y)).all()
    for i in range(3):
        assert abs(pb[i].item() - np_psnr_b(x[i].double().numpy(), y[i].double().numpy())) < 1e-3
