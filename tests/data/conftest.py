"""Fixtures for gradleak's data tests: a network guard and tiny local data sets in the official
formats, built in tmp_path."""

from __future__ import annotations

import io
import pickle
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("gradleak data code tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@dataclass
class FakeCifar:
    root: Path  # the directory holding the extracted folder
    train_images: np.ndarray  # (N, 32, 32, 3) uint8
    train_labels: list[int]
    test_images: np.ndarray
    test_labels: list[int]
    classes: list[str]


def _rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> CIFAR rows: the red plane, then green, then blue, each row-major."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1).copy()


# the pure-Python pickler, whose per-type dispatch table can be extended (the C one cannot)
_PurePickler: Any = pickle._Pickler  # type: ignore[attr-defined]


class _Python2StylePickler(_PurePickler):
    """Writes pickles as the official CIFAR-10 files were written by Python 2: bytes as BINSTRING
    (Python 2's str) and numpy's array reconstructor under its old numpy.core path."""

    dispatch = _PurePickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if getattr(obj, "__name__", "") == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch[bytes] = save_bytes
    dispatch[type(len)] = save_global


def _dump(path: Path, obj: object, python2_style: bool) -> None:
    if python2_style:
        buf = io.BytesIO()
        _Python2StylePickler(buf, protocol=2).dump(obj)
        path.write_bytes(buf.getvalue())
    else:
        # what a Python 3 re-pickling of the batches gives: str keys, numpy's _reconstruct
        path.write_bytes(pickle.dumps(obj, protocol=4))


def make_cifar(root: Path, which: int, batch_sizes: list[int], test_size: int, seed: int = 0) -> FakeCifar:
    """A miniature CIFAR directory. CIFAR-10 is written as the official Python 2 pickles are (bytes
    keys and strings), CIFAR-100 as a Python 3 pickle with str keys, so both are covered."""
    rng = np.random.default_rng(seed)
    num_classes = which
    label_key = "labels" if which == 10 else "fine_labels"
    folder = root / ("cifar-10-batches-py" if which == 10 else "cifar-100-python")
    folder.mkdir(parents=True)

    def batch(n: int) -> tuple[np.ndarray, list[int], dict[Any, object]]:
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = [int(y) for y in rng.integers(0, num_classes, size=n)]
        if which == 10:
            return images, labels, {b"data": _rows(images), b"labels": labels, b"batch_label": b"fake"}
        return images, labels, {"data": _rows(images), label_key: labels, "batch_label": "fake"}

    train_parts = [batch(n) for n in batch_sizes]
    test_images, test_labels, test_dict = batch(test_size)
    classes = [f"class{i}" for i in range(num_classes)]
    if which == 10:
        for i, (_, _, d) in enumerate(train_parts, start=1):
            _dump(folder / f"data_batch_{i}", d, python2_style=True)
        _dump(folder / "test_batch", test_dict, python2_style=True)
        _dump(folder / "batches.meta", {b"label_names": [c.encode() for c in classes]}, python2_style=True)
    else:
        (train_dict,) = [p[2] for p in train_parts]
        _dump(folder / "train", train_dict, python2_style=False)
        _dump(folder / "test", test_dict, python2_style=False)
        _dump(folder / "meta", {"fine_label_names": classes}, python2_style=False)
    return FakeCifar(
        root,
        np.concatenate([p[0] for p in train_parts]),
        [y for p in train_parts for y in p[1]],
        test_images,
        test_labels,
        classes,
    )


@pytest.fixture
def fake_cifar10(tmp_path: Path) -> FakeCifar:
    return make_cifar(tmp_path / "datasets", 10, batch_sizes=[3, 2, 4, 1, 3], test_size=4)


@pytest.fixture
def fake_cifar100(tmp_path: Path) -> FakeCifar:
    return make_cifar(tmp_path / "datasets", 100, batch_sizes=[6], test_size=3, seed=1)


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """An ImageFolder layout: cats/ and dogs/ with 16x16 RGB PNGs; returns the root and the
    pixel arrays by relative path."""
    rng = np.random.default_rng(3)
    root = tmp_path / "folder"
    arrays = {}
    for rel in ("dogs/b.png", "cats/z.png", "cats/a.png", "dogs/a.png"):
        arr = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / rel)
        arrays[rel] = arr
    (root / "notes.txt").write_text("not an image")
    return root, arrays
