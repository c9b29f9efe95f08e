"""load_images (the simulated client's entry point) and normalisation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from service.data import denormalize, load_cifar, load_folder, load_images, load_photo, normalize
from service.errors import SpecError, UnknownNameError
from service.specs import DataSpec, Normalization, SimulatedClient


def test_photos_have_no_labels() -> None:
    client = SimulatedClient(images=["astronaut", "camera"])
    images, labels = load_images(client.source, client.images, 32, 3, client.path)
    assert labels is None
    assert torch.equal(images[1], load_photo("camera", 32))


def test_folder_source_keeps_labels(image_folder: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = image_folder
    images, labels = load_images("folder", ["dogs/a.png", "cats/z.png"], 16, 1, str(root))
    expected = load_folder(root, ["dogs/a.png", "cats/z.png"], 16, 1)
    assert labels == [1, 0] and torch.equal(images, expected[0])


def test_cifar_references_keep_their_order(fake_cifar10: Any) -> None:
    root = str(fake_cifar10.root)
    images, labels = load_images("cifar10", ["test:2", "5", "train:0", "test:0"], 32, 3, root)
    assert labels == [
        fake_cifar10.test_labels[2],
        fake_cifar10.train_labels[5],
        fake_cifar10.train_labels[0],
        fake_cifar10.test_labels[0],
    ]
    assert torch.equal(images[1], load_cifar(root, 10, [5])[0][0])
    assert torch.equal(images[0], load_cifar(root, 10, [2], split="test")[0][0])


@pytest.mark.parametrize("ref", ["abc", "val:3", "-1", "1.5"])
def test_bad_cifar_references(fake_cifar10: Any, ref: str) -> None:
    with pytest.raises(SpecError, match="indices"):
        load_images("cifar10", [ref], 32, 3, str(fake_cifar10.root))


def test_bad_source_or_missing_path() -> None:
    with pytest.raises(UnknownNameError, match="photos"):
        load_images("imagenet", ["1"], 32)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="path"):
        load_images("cifar100", ["1"], 32)
    with pytest.raises(SpecError):
        load_images("photos", [], 32)


def test_normalize_round_trip_and_values() -> None:
    norm = DataSpec().resolved_normalization()
    x = torch.rand(2, 3, 8, 8)
    z = normalize(x, norm)
    for c in range(3):
        assert torch.allclose(z[:, c], (x[:, c] - norm.mean[c]) / norm.std[c])
    assert torch.allclose(denormalize(z, norm), x, atol=1e-6)
    assert torch.allclose(normalize(x[0], norm), z[0])  # (C, H, W) too


def test_normalize_gray_and_channel_mismatch() -> None:
    gray = DataSpec(shape=(1, 16, 16), normalization="imagenet").resolved_normalization()
    x = torch.rand(1, 1, 16, 16)
    assert torch.allclose(denormalize(normalize(x, gray), gray), x, atol=1e-6)
    with pytest.raises(SpecError, match="3 means"):
        normalize(x, Normalization(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)))
