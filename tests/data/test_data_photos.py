from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata

from service.data import ALIASES, CATEGORIES, LUMA_WEIGHTS, PHOTOS, load_photo, photo_names, resize
from service.data import photos as photos_module
from service.errors import SpecError, UnknownNameError


@pytest.mark.usefixtures("no_network")
def test_every_listed_photo_loads_offline() -> None:
    photos_module._original.cache_clear()
    photos_module._faces.cache_clear()
    for name in PHOTOS:
        x = load_photo(name, 16)
        assert x.shape == (3, 16, 16), name
        assert x.dtype == torch.float32
        assert 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
        assert float(x.std()) > 0.01, f"{name} is blank"


@pytest.mark.parametrize("size", [8, 16, 33, 64, 512])
@pytest.mark.parametrize("channels", [1, 3])
def test_any_size_and_channel_count(size: int, channels: int) -> None:
    assert load_photo("coffee", size, channels).shape == (channels, size, size)


def test_centre_crop_keeps_original_pixels_at_native_size() -> None:
    original = skdata.coffee()  # 400 x 600 RGB
    h, w = original.shape[:2]
    left = (w - h) // 2
    expected = torch.from_numpy(original[:, left : left + h].transpose(2, 0, 1).astype(np.float32) / 255)
    assert torch.equal(load_photo("coffee", h), expected)


def test_grayscale_photo_is_replicated_to_rgb() -> None:
    x = load_photo("camera", 32, 3)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert torch.equal(x[:1], load_photo("camera", 32, 1))


def test_rgb_to_gray_uses_bt601_luma() -> None:
    rgb = load_photo("astronaut", 48, 3)
    gray = load_photo("astronaut", 48, 1)
    expected = (rgb * torch.tensor(LUMA_WEIGHTS).view(3, 1, 1)).sum(0)
    assert torch.allclose(gray[0], expected, atol=1e-5)


def test_resize_is_antialiased() -> None:
    # one-pixel stripes alias to solid bands under point sampling; a low-pass resize gives grey
    stripes = torch.zeros(1, 64, 64)
    stripes[:, :, ::2] = 1.0
    small = resize(stripes, 16)
    assert small.shape == (1, 16, 16)
    assert torch.allclose(small, torch.full_like(small, 0.5), atol=0.05)


def test_returns_fresh_tensors_and_decodes_once() -> None:
    photos_module._original.cache_clear()
    a = load_photo("astronaut", 32)
    a.zero_()
    b = load_photo("astronaut", 32)
    assert float(b.max()) > 0.5
    info = photos_module._original.cache_info()
    assert info.misses == 1 and info.hits == 1


def test_aliases_and_faces() -> None:
    assert torch.equal(load_photo("cat", 32), load_photo(ALIASES["cat"], 32))
    faces = skdata.lfw_subset()
    face = load_photo("face07", 25, 1)
    assert torch.allclose(face[0], torch.from_numpy(faces[7].astype(np.float32)), atol=1e-6)
    assert len(photo_names("face")) == 100
    with pytest.raises(UnknownNameError):
        load_photo("face100", 32)


def test_categories() -> None:
    assert photo_names("texture") == ["brick", "grass", "gravel"]
    assert set(photo_names()) == set(PHOTOS)
    assert {"natural", "face", "text", "texture"} <= set(CATEGORIES)
    with pytest.raises(UnknownNameError, match="texture"):
        photo_names("landscapes")


def test_unknown_photo_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="astronaut") as err:
        load_photo("eagle", 32)  # in scikit-image, but only as a download
    assert "face00..face99" in str(err.value)


@pytest.mark.parametrize(("size", "channels"), [(4, 3), (513, 3), (32, 2), (32, 0)])
def test_bad_size_or_channels(size: int, channels: int) -> None:
    with pytest.raises(SpecError):
        load_photo("astronaut", size, channels)
