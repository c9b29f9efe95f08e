"""The metrics registry: what each metric measures and which way means more leakage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.metrics.image import PSNR_CAP_DB, SSIM_WINDOW, mse, psnr, ssim
from service.metrics.perceptual import lpips
from service.registry import Registry


@dataclass(frozen=True)
class MetricOptions:
    """What image metrics may need beyond the images; LPIPS uses all of it."""

    lpips_weights_dir: str | Path | None = None
    lpips_net: str = "alex"
    device: str | torch.device | None = None


PerImage = Callable[[torch.Tensor, torch.Tensor, MetricOptions], torch.Tensor]


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    higher_is_more_leak: bool
    unit: str
    # (recon, truth, options) -> (N,) values for matched image pairs; None for label metrics
    per_image: PerImage | None = None

    def describe(self) -> dict[str, Any]:
        """The catalog entry (JSON-ready)."""
        return {
            "name": self.name,
            "description": self.description,
            "higher_is_more_leak": self.higher_is_more_leak,
            "unit": self.unit,
            "kind": "image" if self.per_image is not None else "label",
        }


METRICS: Registry[Metric] = Registry("metric")

METRICS.add(
    "mse",
    Metric(
        "mse",
        "mean squared error between matched images, [0, 1] pixels",
        higher_is_more_leak=False,
        unit="",
        per_image=lambda r, t, _: mse(r, t),
    ),
)
METRICS.add(
    "psnr",
    Metric(
        "psnr",
        f"peak signal-to-noise ratio, data range 1, capped at {PSNR_CAP_DB:g} dB",
        higher_is_more_leak=True,
        unit="dB",
        per_image=lambda r, t, _: psnr(r, t),
    ),
)
METRICS.add(
    "ssim",
    Metric(
        "ssim",
        f"structural similarity, Gaussian window ({SSIM_WINDOW} taps, sigma 1.5), channels averaged",
        higher_is_more_leak=True,
        unit="",
        per_image=lambda r, t, _: ssim(r, t),
    ),
)
METRICS.add(
    "lpips",
    Metric(
        "lpips",
        "learned perceptual image patch similarity (distance; AlexNet backbone by default)",
        higher_is_more_leak=False,
        unit="",
        per_image=lambda r, t, o: lpips(r, t, o.lpips_net, o.lpips_weights_dir, o.device),
    ),
)
METRICS.add(
    "label_accuracy",
    Metric(
        "label_accuracy",
        "fraction of the client's labels recovered: multiset (order-free) and positional (after matching)",
        higher_is_more_leak=True,
        unit="",
    ),
)


def metric_catalog() -> list[dict[str, Any]]:
    return [m.describe() for _, m in METRICS.items()]
