"""Input checks every gradleak metric runs first: a clear ValueError instead of a silent wrong
number."""

from __future__ import annotations

import torch

# Denormalised reconstructions may overshoot [0, 1] by rounding error; anything further out is a
# caller that forgot to denormalise or clamp.
RANGE_TOLERANCE = 1e-4


def check_images(x: torch.Tensor, name: str) -> torch.Tensor:
    """An (N, C, H, W) floating tensor of finite values in [0, 1]; returned clamped, as float64."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    n, c, h, w = x.shape
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if c not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 channels, got {c}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor in [0, 1], got dtype {x.dtype}")
    x = x.detach()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"{name} must lie in [0, 1] (denormalised pixels), got values in [{lo:.4g}, {hi:.4g}]"
        )
    return x.to(torch.float64).clamp(0.0, 1.0)


def check_pair(recon: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = check_images(recon, "reconstruction")
    t = check_images(truth, "ground truth")
    if r.shape != t.shape:
        raise ValueError(f"reconstruction shape {tuple(r.shape)} differs from ground truth {tuple(t.shape)}")
    if r.device != t.device:
        raise ValueError(f"reconstruction on {r.device} but ground truth on {t.device}")
    return r, t
