"""Images from a local folder: PNG and JPEG files, either flat or in the ImageFolder layout
(one sub-directory per class, labels = index of the class in sorted order, as torchvision's
ImageFolder assigns them)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.data.images import array_to_tensor, check_channels, check_size, square_image
from service.errors import ArtifactError, DatasetNotFoundError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_GRAY_MODES = frozenset({"1", "L", "LA", "I;16", "I;16L", "I;16B"})


@dataclass(frozen=True)
class FolderIndex:
    """What a folder holds: files relative to the root (POSIX), their labels and the class names
    (both None for a flat folder)."""

    root: Path
    files: list[str]
    labels: list[int] | None
    classes: list[str] | None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def index_folder(path: str | Path) -> FolderIndex:
    """List a folder's images in sorted order; sub-directories holding images make it an
    ImageFolder with one class per sub-directory."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder not found: {root} (expected a directory of PNG/JPEG files)")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and _images_in(d))
    if class_dirs:
        files: list[str] = []
        labels: list[int] = []
        for label, d in enumerate(class_dirs):
            for p in _images_in(d):
                files.append(p.relative_to(root).as_posix())
                labels.append(label)
        return FolderIndex(root, files, labels, [d.name for d in class_dirs])
    files = [p.name for p in _images_in(root)]
    if not files:
        raise DatasetNotFoundError(
            f"no PNG/JPEG images in {root} (expected image files, or one sub-directory of them per class)"
        )
    return FolderIndex(root, files, None, None)


def _select(index: FolderIndex, names: list[str]) -> list[int]:
    """Positions of the named files: a path relative to the root, or a bare file name that is
    unique in the folder."""
    by_path = {f: i for i, f in enumerate(index.files)}
    by_base: dict[str, list[int]] = {}
    for i, f in enumerate(index.files):
        by_base.setdefault(f.rsplit("/", 1)[-1], []).append(i)
    chosen = []
    for name in names:
        if name in by_path:
            chosen.append(by_path[name])
            continue
        hits = by_base.get(name, [])
        if len(hits) == 1:
            chosen.append(hits[0])
        elif hits:
            raise DatasetNotFoundError(
                f"{name!r} is ambiguous in {index.root}: use one of "
                + ", ".join(index.files[i] for i in hits[:5])
            )
        else:
            examples = ", ".join(index.files[:3])
            raise DatasetNotFoundError(
                f"no image {name!r} in {index.root} (it holds {len(index.files)} images, e.g. {examples})"
            )
    return chosen


def read_image(path: Path) -> torch.Tensor:
    """Decode one PNG/JPEG file to a (C, H, W) float tensor in [0, 1], C in {1, 3}."""
    try:
        with warnings.catch_warnings():
            # An oversized image is refused below instead of merely warned about.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                mode = im.mode
                if mode in _GRAY_MODES:
                    arr = np.asarray(im.convert("L") if mode in ("1", "LA") else im)
                else:
                    arr = np.asarray(im.convert("RGB"))
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as e:
        raise ArtifactError(f"cannot decode image {path}: {e}") from None
    if arr.dtype != np.uint8:
        arr = arr.astype(np.uint16)
    return array_to_tensor(arr)


def load_folder(
    path: str | Path, names: list[str] | None, size: int, channels: int = 3
) -> tuple[torch.Tensor, list[int] | None]:
    """Images of a local folder as an (N, channels, size, size) float32 tensor in [0, 1] plus
    their labels (ImageFolder layout) or None (flat folder).

    ``names`` picks files (relative paths, or bare names unique in the folder) in the given order;
    None takes every image in sorted order.
    """
    check_size(size)
    check_channels(channels)
    index = index_folder(path)
    positions = list(range(len(index.files))) if names is None else _select(index, names)
    images = torch.stack(
        [square_image(read_image(index.root / index.files[i]), size, channels) for i in positions]
    )
    labels = None if index.labels is None else [index.labels[i] for i in positions]
    return images, labels
