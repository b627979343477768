"""Image-quality metrics on batches of tensors, per image: PSNR, SSIM and PSNR-B.

Conventions, for every function here:

- ``x`` and ``y`` are N x C x H x W tensors of the same shape, on any device, with values in
  ``[0, data_range]`` (``data_range=1.0`` for images scaled by 1/255, ``255`` for raw 8-bit
  values). Integer tensors are converted to float32; half and bfloat16 are computed in float32;
  float64 stays float64.
- Every function returns one value per image, a tensor of shape (N,), in float32 (float64
  for float64 inputs). Average them yourself (or sum them, to combine ranks exactly).
- Channels are taken as they come: RGB unless the caller converts to luma (Y of YCbCr, C=1)
  first, which is what most JPEG-artifact papers report. Nothing here converts colour spaces.
- ``x`` is the image under test (the restored or the JPEG image) and ``y`` the reference (the
  original). PSNR and SSIM are symmetric; PSNR-B is not: its blocking term looks at ``x`` only.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "psnr_b", "blocking_effect_factor"]

#: Smallest mean squared error used by PSNR / PSNR-B, relative to data_range**2: identical
#: images give a finite 100 dB instead of +inf, so sums and means over a data set stay finite.
MSE_FLOOR = 1e-10


def _prepare(x: torch.Tensor, y: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape:
        raise ValueError(f"{name}: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected N x C x H x W tensors, got shape {tuple(x.shape)}")
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    return x.to(dtype), y.to(dtype)


def _mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x - y).pow(2).flatten(1).mean(1)


def _psnr_from_mse(mse: torch.Tensor, data_range: float) -> torch.Tensor:
    peak = float(data_range) ** 2
    return 10.0 * torch.log10(peak / mse.clamp_min(MSE_FLOOR * peak))


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: 10 log10(data_range^2 / MSE), shape (N,).

    The MSE is the mean over channels and pixels of one image. It is floored at
    ``1e-10 * data_range**2``, so identical images give 100 dB, not +inf.
    """
    x, y = _prepare(x, y, "psnr")
    return _psnr_from_mse(_mse(x, y), data_range)


@functools.lru_cache(maxsize=16)
def _gaussian_taps(size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The normalised 1-D Gaussian, built once per device and dtype (no host-to-device copy per image)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return (g / g.sum()).to(device=device, dtype=dtype)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity per image (Wang, Bovik, Sheikh & Simoncelli 2004), shape (N,).

    The standard definition: local statistics under an 11x11 Gaussian window (sigma 1.5,
    normalised to sum 1), C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = data_range,

        SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),

    computed for each channel separately with 'valid' filtering (no padding: only windows that
    lie inside the image), then averaged over the channels and positions of each image. The
    (co)variances are the biased ones, E[xy] - mu_x mu_y, as in the reference implementation.
    No downsampling is applied (the reference MATLAB code's automatic downsampling of large
    images is not part of the definition). Images need both sides >= window_size.

    The Gaussian window is separable: the five local means (x, y, x^2, y^2, xy) are one
    depthwise 1 x 11 filtering and one 11 x 1 over the five maps stacked, 22 multiplies a
    pixel and map instead of 121. float32 agrees with float64 to within 1e-5 (tests/test_metrics.py).
    """
    x, y = _prepare(x, y, "ssim")
    n, c, h, w = x.shape
    if h < window_size or w < window_size:
        raise ValueError(f"ssim: images of {h}x{w} are smaller than the {window_size}x{window_size} window")
    g = _gaussian_taps(window_size, sigma, x.device, x.dtype)
    maps = torch.stack([x, y, x * x, y * y, x * y], dim=1).reshape(n, 5 * c, h, w)
    maps = F.conv2d(maps, g.reshape(1, 1, 1, -1).expand(5 * c, 1, 1, window_size), groups=5 * c)
    maps = F.conv2d(maps, g.reshape(1, 1, -1, 1).expand(5 * c, 1, window_size, 1), groups=5 * c)
    mu_x, mu_y, e_xx, e_yy, e_xy = maps.reshape(n, 5, c, h - window_size + 1, w - window_size + 1).unbind(1)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov = e_xx - mu_xx, e_yy - mu_yy, e_xy - mu_xy
    ssim_map = ((2 * mu_xy + c1) * (2 * cov + c2)) / ((mu_xx + mu_yy + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def blocking_effect_factor(x: torch.Tensor, block: int = 8) -> torch.Tensor:
    """The blocking effect factor BEF of Yim & Bovik (2011), per image and channel: (N, C).

    With neighbouring pixel pairs split into those straddling a block boundary (columns
    ``k*block - 1 | k*block``, and likewise rows; the grid starts at the top-left corner, as
    JPEG's does) and all the others,

        D_B   = mean squared difference over the boundary pairs (horizontal and vertical pooled),
        D_B^c = the same over the non-boundary pairs,
        BEF   = eta * (D_B - D_B^c) if D_B > D_B^c else 0,   eta = log2(block) / log2(min(H, W)).

    The pair counts are the counts actually present, which are the paper's N_H (N_H/B - 1) etc.
    when the sides are multiples of the block size. An image without any boundary pair (a side
    under block + 1 in both directions) has BEF 0.
    """
    if x.dim() != 4:
        raise ValueError(f"blocking_effect_factor: expected N x C x H x W, got shape {tuple(x.shape)}")
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    n, c, h, w = x.shape
    dh = (x[..., :, 1:] - x[..., :, :-1]).pow(2)  # horizontal pairs (j, j+1): N x C x H x (W-1)
    dv = (x[..., 1:, :] - x[..., :-1, :]).pow(2)  # vertical pairs (i, i+1): N x C x (H-1) x W
    h_boundary = torch.arange(block - 1, w - 1, block, device=x.device)  # j with j+1 a multiple of block
    v_boundary = torch.arange(block - 1, h - 1, block, device=x.device)
    sum_all = dh.sum((2, 3)) + dv.sum((2, 3))
    sum_b = dh.index_select(3, h_boundary).sum((2, 3)) + dv.index_select(2, v_boundary).sum((2, 3))
    n_b = h * len(h_boundary) + w * len(v_boundary)
    n_all = h * (w - 1) + w * (h - 1)
    n_bc = n_all - n_b
    if n_b == 0 or n_bc == 0:
        return torch.zeros(n, c, dtype=x.dtype, device=x.device)
    d_b = sum_b / n_b
    d_bc = (sum_all - sum_b) / n_bc
    eta = math.log2(block) / math.log2(min(h, w))
    return torch.where(d_b > d_bc, eta * (d_b - d_bc), torch.zeros_like(d_b))


def psnr_b(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, block: int = 8) -> torch.Tensor:
    """PSNR-B (Yim & Bovik 2011) in dB per image, shape (N,): PSNR with a blocking penalty.

        MSE-B  = MSE(x, y) + BEF(x),      PSNR-B = 10 log10(data_range^2 / MSE-B)

    ``x`` must be the image under test (JPEG or restored) and ``y`` the reference: BEF is
    measured on ``x`` alone (see :func:`blocking_effect_factor`), on the 8x8 grid anchored at
    the top-left corner, so crop only by multiples of the block size before calling.

    Channels: MSE and BEF are computed per channel and averaged over the channels *before*
    the logarithm (MSE-B = mean_c (MSE_c + BEF_c)). For C=1 (the usual luma evaluation) this is
    exactly the paper's definition; for RGB it keeps PSNR-B <= PSNR always and PSNR-B == PSNR
    when no channel shows blocking, which averaging per-channel dB values would not.
    Floored like :func:`psnr`.
    """
    x, y = _prepare(x, y, "psnr_b")
    mse_b = _mse(x, y) + blocking_effect_factor(x, block).mean(1)
    return _psnr_from_mse(mse_b, data_range)
