"""CIFAR-10 and CIFAR-100 from a local copy of the official "python version" archives.

The official files are pickles. gradleak reads them only from a path the user points at, never
downloads them, and unpickles them with an allow-list that admits nothing but plain containers
and numpy's array reconstruction, so a tampered file cannot run code.

Expected layout, ``path`` being either the directory that holds the extracted folder or the
folder itself:

    cifar-10-batches-py/   data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/      train, test, meta
"""

from __future__ import annotations

import importlib
import io
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from service.data.images import check_channels, check_size, square_image
from service.errors import ArtifactError, DatasetNotFoundError, SpecError

CIFAR_SIDE = 32
Split = Literal["train", "test"]


@dataclass(frozen=True)
class _Layout:
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str


_LAYOUTS: dict[int, _Layout] = {
    10: _Layout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
    ),
    100: _Layout("cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names"),
}


def _numpy_reconstruct() -> Any:
    # numpy 2 moved numpy.core to numpy._core; files written by either refer to one of the two.
    try:
        return importlib.import_module("numpy._core.multiarray")._reconstruct
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")._reconstruct


_RECONSTRUCT = _numpy_reconstruct()
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "bytes"): bytes,
    ("builtins", "str"): str,
    ("builtins", "int"): int,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}") from None


def restricted_unpickle(data: bytes) -> Any:
    """Unpickle CIFAR's batch format; any global outside the allow-list raises UnpicklingError.
    encoding="bytes" is what the CIFAR authors prescribe for their Python 2 pickles."""
    return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _str_keys(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path} is not a CIFAR batch (a pickled dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _read(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetNotFoundError(f"cannot read {path}: {e.strerror}") from None
    try:
        obj = restricted_unpickle(data)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ArtifactError(f"{path} is not a valid CIFAR file: {e}") from None
    return _str_keys(obj, path)


@dataclass(frozen=True)
class _Batch:
    images: np.ndarray  # (N, 32, 32, 3) uint8, read-only
    labels: np.ndarray  # (N,) int64, read-only


@lru_cache(maxsize=8)
def _load_batch(path: Path, label_key: str, num_classes: int, _mtime_ns: int, _size: int) -> _Batch:
    """One decoded batch file; the cache key carries the file's mtime and size so a replaced file
    is read again."""
    d = _read(path)
    data, labels = d.get("data"), d.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ArtifactError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    if data.shape[1] != 3 * CIFAR_SIDE * CIFAR_SIDE:
        raise ArtifactError(f"{path}: 'data' rows have {data.shape[1]} values, expected 3072")
    if not isinstance(labels, list | np.ndarray) or len(labels) != data.shape[0]:
        raise ArtifactError(f"{path}: {label_key!r} must hold one label per image")
    try:
        label_arr = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise ArtifactError(f"{path}: {label_key!r} must be integers") from None
    if label_arr.size and (label_arr.min() < 0 or label_arr.max() >= num_classes):
        raise ArtifactError(f"{path}: {label_key!r} must lie in 0..{num_classes - 1}")
    # rows are 1024 red, then 1024 green, then 1024 blue values, each row-major 32 x 32
    images = data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
    images.flags.writeable = False
    label_arr.flags.writeable = False
    return _Batch(images, label_arr)


def _batch(path: Path, label_key: str, num_classes: int) -> _Batch:
    st = path.stat()
    return _load_batch(path, label_key, num_classes, st.st_mtime_ns, st.st_size)


def _check_which(which: int) -> _Layout:
    if which not in _LAYOUTS:
        raise SpecError(f"CIFAR comes as 10 or 100 classes, got {which!r}")
    return _LAYOUTS[which]


def cifar_dir(path: str | Path, which: int) -> Path:
    """The extracted CIFAR folder under ``path`` (or ``path`` itself); raises DatasetNotFoundError
    naming the directories looked at and the expected files."""
    layout = _check_which(which)
    root = Path(path).expanduser()
    candidates = [root / layout.folder, root]
    for c in candidates:
        if all((c / f).is_file() for f in (*layout.train, *layout.test)):
            return c
    expected = ", ".join((*layout.train, *layout.test, layout.meta))
    raise DatasetNotFoundError(
        f"CIFAR-{which} not found: looked in {candidates[0]} and {candidates[1]} for {expected} "
        f"(extract the official python-version archive so that {candidates[0]} holds them; "
        "gradleak never downloads data sets)"
    )


def cifar_classes(path: str | Path, which: int = 10) -> list[str]:
    """Class names from the meta file."""
    layout = _check_which(which)
    meta_path = cifar_dir(path, which) / layout.meta
    meta = _read(meta_path)
    names = meta.get(layout.names_key)
    if not isinstance(names, list) or not all(isinstance(n, bytes | str) for n in names):
        raise ArtifactError(f"{meta_path}: {layout.names_key!r} must be a list of names")
    return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]


def load_cifar(
    path: str | Path,
    which: int,
    indices: list[int],
    split: Split = "train",
    size: int = CIFAR_SIDE,
    channels: int = 3,
) -> tuple[torch.Tensor, list[int]]:
    """Images ``indices`` of a CIFAR split as an (N, channels, size, size) float32 tensor in
    [0, 1], and their labels. Indices run over the split's batches in file order (0..49999 for
    train, 0..9999 for test in the official files)."""
    layout = _check_which(which)
    if split not in ("train", "test"):
        raise SpecError(f"CIFAR split is 'train' or 'test', got {split!r}")
    check_size(size)
    check_channels(channels)
    if not indices:
        raise SpecError("give at least one CIFAR index")
    folder = cifar_dir(path, which)
    files = layout.train if split == "train" else layout.test
    wanted = sorted(set(indices))
    found: dict[int, tuple[np.ndarray, int]] = {}
    start = 0
    for name in files:
        if len(found) == len(wanted):
            break
        batch = _batch(folder / name, layout.label_key, which)
        end = start + len(batch.labels)
        for i in wanted:
            if start <= i < end:
                found[i] = (batch.images[i - start], int(batch.labels[i - start]))
        start = end
    missing = [i for i in wanted if i not in found]
    if missing:
        raise SpecError(f"CIFAR-{which} {split} indices {missing[:5]} outside 0..{start - 1}")
    pixels = [torch.from_numpy(found[i][0].transpose(2, 0, 1).astype(np.float32) / 255.0) for i in indices]
    images = torch.stack([square_image(p, size, channels) for p in pixels])
    return images, [found[i][1] for i in indices]
