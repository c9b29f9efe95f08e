"""PSNR, SSIM and MSE against scikit-image, and the input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from service.data import load_photo
from service.errors import MetricUnavailableError
from service.metrics import PSNR_CAP_DB, check_images, mse, psnr, ssim


def _pairs(channels: int, real: bool, h: int = 40, w: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(channels + 10 * real)
    if real:
        side = min(h, w)
        truth = torch.stack([load_photo(n, side, channels) for n in ("astronaut", "camera", "coins")])
        truth = truth.double()
    else:
        truth = torch.rand(3, channels, h, w, generator=gen, dtype=torch.float64)
    noise = torch.randn(truth.shape, generator=gen, dtype=torch.float64)
    scales = torch.tensor([0.02, 0.1, 0.3], dtype=torch.float64).view(3, 1, 1, 1)
    return (truth + scales * noise).clamp(0, 1), truth


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("real", [False, True])
def test_psnr_and_mse_match_skimage(channels: int, real: bool) -> None:
    recon, truth = _pairs(channels, real)
    ours_psnr, ours_mse = psnr(recon, truth), mse(recon, truth)
    assert ours_psnr.dtype == torch.float64 and ours_psnr.shape == (3,)
    for i in range(3):
        a, b = truth[i].numpy(), recon[i].numpy()
        assert float(ours_psnr[i]) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-8)
        assert float(ours_mse[i]) == pytest.approx(mean_squared_error(a, b), rel=1e-10)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("real", [False, True])
@pytest.mark.parametrize(("h", "w"), [(40, 37), (11, 11), (64, 64)])
def test_ssim_matches_skimage(channels: int, real: bool, h: int, w: int) -> None:
    recon, truth = _pairs(channels, real, h, w)
    ours = ssim(recon, truth)
    for i in range(3):
        expected = structural_similarity(
            truth[i].numpy(),
            recon[i].numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=0,
        )
        assert float(ours[i]) == pytest.approx(expected, abs=1e-4)
    assert float(ours[0]) > float(ours[2])  # less noise, more similar


def test_ssim_of_float32_inputs_and_identity() -> None:
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_identical_images_cap_psnr() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert psnr(x, x).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]
    almost = x.clone()
    almost[0, 0, 0, 0] = 1 - almost[0, 0, 0, 0]
    assert float(psnr(almost, x)[0]) < PSNR_CAP_DB


def test_ssim_needs_the_window() -> None:
    x = torch.rand(1, 3, 10, 32)
    with pytest.raises(MetricUnavailableError, match="11x11"):
        ssim(x, x)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.rand(3, 8, 8), "shape"),
        (torch.rand(2, 2, 8, 8), "channels"),
        (torch.rand(2, 3, 8, 8) * 2, r"\[0, 1\]"),
        (torch.rand(2, 3, 8, 8) - 0.5, r"\[0, 1\]"),
        (torch.full((2, 3, 8, 8), float("nan")), "NaN"),
        (torch.ones(2, 3, 8, 8, dtype=torch.uint8), "floating"),
        (torch.rand(0, 3, 8, 8), "empty"),
        (np.zeros((2, 3, 8, 8)), "torch.Tensor"),
    ],
)
def test_bad_inputs_raise(bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_images(bad, "images")  # type: ignore[arg-type]


@pytest.mark.parametrize("fn", [mse, psnr, ssim])
def test_mismatched_shapes_raise(fn: object) -> None:
    with pytest.raises(ValueError, match="differs"):
        fn(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 15))  # type: ignore[operator]


def test_rounding_overshoot_is_tolerated() -> None:
    x = torch.rand(1, 3, 16, 16)
    nudged = x.clone()
    nudged[0, 0, 0, 0] = 1 + 1e-6
    assert float(mse(nudged, x)) >= 0
