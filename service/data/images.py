"""Pixel plumbing shared by every gradleak data source: arrays to tensors, square crops, resizing,
channel conversion and normalisation.

Resizing is torch's bilinear interpolation with ``antialias=True`` (what torchvision's ``Resize``
does on tensors): it low-pass filters when shrinking, never overshoots [0, 1] (unlike Lanczos or
bicubic) and runs on any device.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from service.errors import SpecError
from service.specs import MAX_IMAGE_SIDE, Normalization

MIN_IMAGE_SIDE = 8
# ITU-R BT.601 luma, the weights torchvision's rgb_to_grayscale and PIL's "L" conversion use.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_IMAGE_SIDE <= size <= MAX_IMAGE_SIDE:
        raise SpecError(f"image size must be an integer in {MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE}, got {size!r}")
    return size


def check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise SpecError(f"images have 1 or 3 channels, got {channels!r}")
    return channels


def array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """An (H, W) or (H, W, C) array (uint8, bool, uint16 or float in [0, 1]) -> a fresh (C, H, W)
    float32 tensor in [0, 1]. An alpha channel is dropped."""
    if arr.dtype == np.bool_:
        scaled = arr.astype(np.float32)
    elif arr.dtype == np.uint8:
        scaled = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        scaled = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        scaled = np.clip(arr.astype(np.float32), 0.0, 1.0)
    else:
        raise ValueError(f"unsupported pixel type {arr.dtype}")
    if scaled.ndim == 2:
        scaled = scaled[:, :, None]
    if scaled.ndim != 3 or scaled.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"unsupported image array shape {arr.shape}")
    if scaled.shape[2] in (2, 4):
        scaled = scaled[:, :, :-1]
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))


def to_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """(..., C, H, W) with C in {1, 3} -> the requested channel count: gray is replicated to RGB,
    RGB is converted to gray with BT.601 luma."""
    check_channels(channels)
    c = img.shape[-3]
    if c == channels:
        return img
    if c == 1:
        return img.expand(*img.shape[:-3], 3, *img.shape[-2:]).clone()
    if c == 3:
        w = torch.tensor(LUMA_WEIGHTS, dtype=img.dtype, device=img.device).view(3, 1, 1)
        return (img * w).sum(dim=-3, keepdim=True)
    raise ValueError(f"cannot convert {c} channels to {channels}")


def centre_crop_square(img: torch.Tensor) -> torch.Tensor:
    h, w = img.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return img[..., top : top + side, left : left + side]


def resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) or (N, C, H, W) -> side ``size`` square, antialiased bilinear, clamped to [0, 1]."""
    if img.shape[-2:] == (size, size):
        return img
    batch = img if img.dim() == 4 else img.unsqueeze(0)
    out = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out.clamp_(0.0, 1.0)
    return out if img.dim() == 4 else out.squeeze(0)


def square_image(img: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Centre crop to a square, resize to ``size`` and convert to ``channels``: the one way every
    gradleak data source shapes its images."""
    return to_channels(resize(centre_crop_square(img), size), channels).contiguous()


def _stats(norm: Normalization, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() not in (3, 4):
        raise SpecError(f"images are (C, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")
    c = x.shape[-3]
    if len(norm.mean) != c or len(norm.std) != c:
        raise SpecError(
            f"normalization has {len(norm.mean)} means and {len(norm.std)} stds, the images have {c} channels"
        )
    mean = torch.tensor(norm.mean, dtype=x.dtype, device=x.device).view(c, 1, 1)
    std = torch.tensor(norm.std, dtype=x.dtype, device=x.device).view(c, 1, 1)
    return mean, std


def normalize(x: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """[0, 1] pixels -> (x - mean) / std per channel; differentiable, returns a new tensor."""
    mean, std = _stats(norm, x)
    return (x - mean) / std


def denormalize(x: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """The inverse of `normalize`: x * std + mean (not clamped, so attacks keep their gradients)."""
    mean, std = _stats(norm, x)
    return x * std + mean
