"""CIFAR from a local copy; the fake_cifar fixtures (conftest.py) are FakeCifar records."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from service.data import cifar_classes, load_cifar, restricted_unpickle
from service.data.images import LUMA_WEIGHTS
from service.errors import ArtifactError, DatasetNotFoundError, SpecError


def _tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32) / 255)


def test_cifar10_indices_span_the_batches(fake_cifar10: Any) -> None:
    indices = [12, 0, 4, 9, 4]  # batches hold 3, 2, 4, 1, 3 images: these touch four of them
    images, labels = load_cifar(fake_cifar10.root, 10, indices)
    assert images.shape == (5, 3, 32, 32)
    assert labels == [fake_cifar10.train_labels[i] for i in indices]
    for img, i in zip(images, indices, strict=True):
        assert torch.equal(img, _tensor(fake_cifar10.train_images[i]))


def test_cifar10_test_split_and_folder_given_directly(fake_cifar10: Any) -> None:
    folder = fake_cifar10.root / "cifar-10-batches-py"
    images, labels = load_cifar(folder, 10, [3, 1], split="test")
    assert labels == [fake_cifar10.test_labels[3], fake_cifar10.test_labels[1]]
    assert torch.equal(images[0], _tensor(fake_cifar10.test_images[3]))
    assert cifar_classes(folder, 10) == fake_cifar10.classes


def test_cifar100_fine_labels_resized_and_gray(fake_cifar100: Any) -> None:
    images, labels = load_cifar(fake_cifar100.root, 100, [5, 2], size=16, channels=1)
    assert images.shape == (2, 1, 16, 16)
    assert labels == [fake_cifar100.train_labels[5], fake_cifar100.train_labels[2]]
    rgb = _tensor(fake_cifar100.train_images[5])
    gray = (rgb * torch.tensor(LUMA_WEIGHTS).view(3, 1, 1)).sum(0)
    # the mean survives an area-preserving downscale
    assert float(images[0].mean()) == pytest.approx(float(gray.mean()), abs=1e-3)
    assert cifar_classes(fake_cifar100.root, 100) == fake_cifar100.classes


def test_missing_directory_names_the_paths_and_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_cifar(tmp_path / "data", 10, [0])
    message = str(err.value)
    assert str(tmp_path / "data" / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "test_batch" in message


def test_index_out_of_range_and_bad_arguments(fake_cifar10: Any) -> None:
    n = len(fake_cifar10.train_labels)
    with pytest.raises(SpecError, match=f"0..{n - 1}"):
        load_cifar(fake_cifar10.root, 10, [n])
    with pytest.raises(SpecError):
        load_cifar(fake_cifar10.root, 10, [-1])
    with pytest.raises(SpecError):
        load_cifar(fake_cifar10.root, 20, [0])
    with pytest.raises(SpecError):
        load_cifar(fake_cifar10.root, 10, [0], split="validation")  # type: ignore[arg-type]


class _Exploit:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.remove, (str(self.canary),)


def test_a_tampered_batch_is_refused_without_running_code(fake_cifar10: Any, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.write_text("still here")
    batch = fake_cifar10.root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": _Exploit(canary), b"labels": [0]}, protocol=4))
    with pytest.raises(ArtifactError, match=r"refused to load posix\.remove|refused to load os\.remove"):
        load_cifar(fake_cifar10.root, 10, [0])
    assert canary.exists()


def test_restricted_unpickler_allows_only_plain_data() -> None:
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    out = restricted_unpickle(pickle.dumps({"data": arr, "labels": [1, 2]}, protocol=4))
    assert np.array_equal(out["data"], arr) and out["labels"] == [1, 2]
    with pytest.raises(pickle.UnpicklingError, match=r"collections\.OrderedDict"):
        restricted_unpickle(pickle.dumps(__import__("collections").OrderedDict(a=1), protocol=4))


def test_malformed_batch(fake_cifar10: Any) -> None:
    batch = fake_cifar10.root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}, protocol=4))
    with pytest.raises(ArtifactError, match="3072"):
        load_cifar(fake_cifar10.root, 10, [0])
    batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, protocol=4))
    with pytest.raises(ArtifactError, match=r"0\.\.9"):
        load_cifar(fake_cifar10.root, 10, [0])
    batch.write_bytes(b"not a pickle")
    with pytest.raises(ArtifactError, match="not a valid CIFAR file"):
        load_cifar(fake_cifar10.root, 10, [0])
