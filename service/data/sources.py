"""One entry point for the images of a simulated client (service.specs.SimulatedClient)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from service.data.cifar import Split, load_cifar
from service.data.folder import load_folder
from service.data.images import check_channels, check_size
from service.data.photos import load_photo
from service.errors import SpecError
from service.registry import Registry

Source = Literal["photos", "folder", "cifar10", "cifar100"]
Loader = Callable[[list[str], int, int, str | None], tuple[torch.Tensor, list[int] | None]]

SOURCES: Registry[Loader] = Registry("image source")


@SOURCES.register("photos")
def _photos(images: list[str], size: int, channels: int, path: str | None) -> tuple[torch.Tensor, None]:
    return torch.stack([load_photo(name, size, channels) for name in images]), None


@SOURCES.register("folder")
def _folder(
    images: list[str], size: int, channels: int, path: str | None
) -> tuple[torch.Tensor, list[int] | None]:
    return load_folder(_need_path("folder", path), images, size, channels)


def _cifar_index(ref: str) -> tuple[Split, int]:
    """CIFAR images are named by their index in the train split ("123"), or "test:123"."""
    split, _, number = ref.rpartition(":")
    if split not in ("", "train", "test") or not number.strip().isdigit():
        raise SpecError(f"CIFAR images are indices such as '17' or 'test:17', got {ref!r}")
    return ("test" if split == "test" else "train"), int(number)


def _cifar(which: int) -> Loader:
    def load(images: list[str], size: int, channels: int, path: str | None) -> tuple[torch.Tensor, list[int]]:
        root = _need_path(f"cifar{which}", path)
        # one image per call: decoded batches are cached, so this costs no extra reads
        loaded = [
            load_cifar(root, which, [i], split, size, channels) for split, i in map(_cifar_index, images)
        ]
        return torch.cat([imgs for imgs, _ in loaded]), [labels[0] for _, labels in loaded]

    return load


SOURCES.add("cifar10", _cifar(10))
SOURCES.add("cifar100", _cifar(100))


def _need_path(source: str, path: str | None) -> str:
    if path is None:
        raise SpecError(f"source {source!r} needs a dataset path")
    return path


def load_images(
    source: Source, images: list[str], size: int, channels: int = 3, path: str | None = None
) -> tuple[torch.Tensor, list[int] | None]:
    """(N, channels, size, size) float32 images in [0, 1] and their labels when the data set has
    them (folder in ImageFolder layout, CIFAR), else None."""
    check_size(size)
    check_channels(channels)
    if not images:
        raise SpecError("give at least one image")
    return SOURCES.get(source)(list(images), size, channels, path)
