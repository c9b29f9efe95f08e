from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.data import index_folder, load_folder
from service.errors import ArtifactError, DatasetNotFoundError, SpecError


def _tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32) / 255)


def test_image_folder_layout_gives_sorted_files_and_class_labels(
    image_folder: tuple[Path, dict[str, np.ndarray]],
) -> None:
    root, arrays = image_folder
    index = index_folder(root)
    assert index.files == ["cats/a.png", "cats/z.png", "dogs/a.png", "dogs/b.png"]
    assert index.classes == ["cats", "dogs"]
    images, labels = load_folder(root, None, 16)
    assert labels == [0, 0, 1, 1]
    assert images.shape == (4, 3, 16, 16)
    for img, rel in zip(images, index.files, strict=True):
        assert torch.equal(img, _tensor(arrays[rel]))  # PNG is lossless, size unchanged


def test_names_pick_files_in_the_given_order(image_folder: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, arrays = image_folder
    images, labels = load_folder(root, ["dogs/b.png", "z.png", "cats/a.png"], 16)
    assert labels == [1, 0, 0]
    assert torch.equal(images[1], _tensor(arrays["cats/z.png"]))


def test_ambiguous_or_missing_names(image_folder: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = image_folder
    with pytest.raises(DatasetNotFoundError, match="ambiguous"):
        load_folder(root, ["a.png"], 16)
    with pytest.raises(DatasetNotFoundError, match=r"no image 'missing\.png'"):
        load_folder(root, ["missing.png"], 16)


def test_flat_folder_has_no_labels_and_converts_modes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(20, 30), dtype=np.uint8)
    rgba = rng.integers(0, 256, size=(24, 24, 4), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "b_gray.png")
    Image.fromarray(rgba).save(tmp_path / "a_rgba.png")
    ramp = np.linspace(0, 255, 24, dtype=np.uint8)
    smooth = np.stack(
        [np.tile(ramp, (24, 1)), np.tile(ramp[:, None], (1, 24)), np.full((24, 24), 128, np.uint8)], -1
    )
    Image.fromarray(smooth).save(tmp_path / "c.jpg", quality=95)
    images, labels = load_folder(tmp_path, None, 12, channels=3)
    assert labels is None
    assert images.shape == (3, 3, 12, 12)
    assert torch.equal(images[1][0], images[1][2])  # gray replicated
    rgb_only = load_folder(tmp_path, ["a_rgba.png"], 24)[0][0]
    assert torch.equal(rgb_only, _tensor(rgba[:, :, :3]))  # alpha dropped
    jpeg = load_folder(tmp_path, ["c.jpg"], 24)[0][0]
    assert (jpeg - _tensor(smooth)).abs().mean() < 0.02  # lossy but close
    gray_only = load_folder(tmp_path, ["b_gray.png"], 20, channels=1)[0][0, 0]
    assert torch.equal(gray_only, torch.from_numpy(gray[:, 5:25].astype(np.float32) / 255))


def test_missing_empty_or_corrupt(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match=str(missing)):
        load_folder(missing, None, 16)
    with pytest.raises(DatasetNotFoundError, match="no PNG/JPEG"):
        load_folder(tmp_path, None, 16)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ArtifactError, match=r"broken\.png"):
        load_folder(tmp_path, None, 16)
    with pytest.raises(SpecError):
        load_folder(tmp_path, None, 1000)
