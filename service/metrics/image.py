"""Pixel metrics between reconstructions and ground truth, per image, in float64.

Images are (N, C, H, W) tensors in [0, 1]; every function returns an (N,) float64 tensor on
the inputs' device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from service.errors import MetricUnavailableError
from service.metrics.checks import check_pair

# A perfect reconstruction has infinite PSNR, which JSON cannot hold: PSNR is capped here, at a
# level (MSE 1e-10) no lossy reconstruction reaches.
PSNR_CAP_DB = 100.0

# SSIM as Wang et al. (2004) and scikit-image's structural_similarity(gaussian_weights=True,
# sigma=1.5, use_sample_covariance=False, data_range=1): an 11-tap Gaussian window (truncate 3.5).
SSIM_SIGMA = 1.5
SSIM_WINDOW = 2 * int(3.5 * SSIM_SIGMA + 0.5) + 1
_K1, _K2 = 0.01, 0.03


def mse(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each image pair over channels and pixels."""
    r, t = check_pair(recon, truth)
    return (r - t).pow(2).mean(dim=(1, 2, 3))


def psnr_from_mse(err: torch.Tensor) -> torch.Tensor:
    """PSNR in dB for data range 1, capped at PSNR_CAP_DB (a zero error gives the cap)."""
    floor = 10.0 ** (-PSNR_CAP_DB / 10.0)
    return -10.0 * torch.log10(err.clamp_min(floor))


def psnr(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio of each image pair in dB (data range 1), capped at PSNR_CAP_DB."""
    return psnr_from_mse(mse(recon, truth))


def _gaussian_window(device: torch.device) -> torch.Tensor:
    radius = SSIM_WINDOW // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return g / g.sum()


def _blur_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter over (M, 1, H, W), keeping only positions whose window lies inside
    the image: exactly the region scikit-image averages after cropping the filter radius."""
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    return F.conv2d(x, g.view(1, 1, -1, 1))


def ssim(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean structural similarity of each image pair (channels averaged), as scikit-image computes
    it with Gaussian weights. Images smaller than the window (SSIM_WINDOW = 11 pixels a side)
    raise MetricUnavailableError."""
    r, t = check_pair(recon, truth)
    n, c, h, w = r.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise MetricUnavailableError(
            f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels (its window), got {h}x{w}"
        )
    g = _gaussian_window(r.device)
    c1, c2 = _K1**2, _K2**2
    out = torch.empty(n, dtype=torch.float64, device=r.device)
    # one image at a time bounds the memory of the five filtered float64 maps
    for i in range(n):
        x = r[i].reshape(c, 1, h, w)
        y = t[i].reshape(c, 1, h, w)
        stacked = torch.cat([x, y, x * x, y * y, x * y])
        ux, uy, uxx, uyy, uxy = _blur_valid(stacked, g).split(c)
        vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        out[i] = s.mean()
    return out
