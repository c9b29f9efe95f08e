"""A small labelled classification task made of real pixels, for FL training runs without any
downloaded data set: random crops of the shipped photos, labelled with the photo they come from."""

from __future__ import annotations

import torch

from service.data.images import check_channels, check_size, resize
from service.data.photos import load_photo, resolve_photo_name
from service.errors import SpecError

# Ten visually distinct photos, CIFAR-10's class count.
DEFAULT_PATCH_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
)
# The photo is shown at four times the patch side, so one patch covers about a sixteenth of it.
_CONTEXT = 4
_SCALE_JITTER = (0.8, 1.25)


def photo_patches(
    size: int = 32,
    photos: list[str] | None = None,
    per_class: int = 200,
    seed: int = 0,
    channels: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` random crops of each photo: (N, channels, size, size) float32 in [0, 1] and
    int64 labels (index of the source photo in ``photos``), grouped by class.

    Each crop has a random side in [0.8, 1.25] x ``size`` of the photo shown at 4 x ``size``
    (capped at 512), a random position and a random horizontal flip, and is resized to ``size``.
    The same arguments give the same tensors.
    """
    check_size(size)
    check_channels(channels)
    names = list(DEFAULT_PATCH_PHOTOS if photos is None else photos)
    if len(names) < 2:
        raise SpecError("a classification task needs at least two photos")
    canonical = [resolve_photo_name(n) for n in names]
    if len(set(canonical)) != len(canonical):
        raise SpecError(f"photos repeat: {names}")
    if per_class < 1:
        raise SpecError(f"per_class must be positive, got {per_class}")
    gen = torch.Generator().manual_seed(seed)
    base_side = min(_CONTEXT * size, 512)
    lo, hi = _SCALE_JITTER
    images = torch.empty(len(names) * per_class, channels, size, size)
    for label, name in enumerate(canonical):
        base = load_photo(name, base_side, channels)
        sides = (size * (lo + (hi - lo) * torch.rand(per_class, generator=gen))).round().long()
        sides = sides.clamp(1, base_side)
        offsets = torch.rand(per_class, 2, generator=gen)
        flips = torch.rand(per_class, generator=gen) < 0.5
        for k in range(per_class):
            s = int(sides[k])
            top = int(offsets[k, 0] * (base_side - s + 1))
            left = int(offsets[k, 1] * (base_side - s + 1))
            crop = resize(base[:, top : top + s, left : left + s], size)
            images[label * per_class + k] = crop.flip(-1) if flips[k] else crop
    labels = torch.arange(len(names)).repeat_interleave(per_class)
    return images, labels


def train_test_split(
    images: torch.Tensor, labels: torch.Tensor, test_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified, seeded split: (train_x, train_y, test_x, test_y); each class gives
    round(test_fraction x its count) samples (at least one when it has two or more) to the test
    set, and both sets are shuffled."""
    if not 0 < test_fraction < 1:
        raise SpecError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    if images.shape[0] != labels.shape[0]:
        raise SpecError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = round(test_fraction * idx.numel())
        if idx.numel() >= 2:
            n_test = min(max(n_test, 1), idx.numel() - 1)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr = torch.cat(train_idx)
    te = torch.cat(test_idx)
    tr = tr[torch.randperm(tr.numel(), generator=gen)]
    te = te[torch.randperm(te.numel(), generator=gen)]
    return images[tr], labels[tr], images[te], labels[te]
