"""Sample photos shipped inside the scikit-image distribution.

Only images whose files are part of the installed wheel are listed: scikit-image fetches its other
data sets over the network (pooch), which gradleak never does. Faces are the 100 face crops of
``skimage.data.lfw_subset`` (25 x 25 grayscale), named ``face00`` .. ``face99``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import torch
from skimage import data as skdata

from service.data.images import array_to_tensor, check_channels, check_size, square_image
from service.errors import UnknownNameError

NUM_FACES = 100  # lfw_subset: the first 100 crops are faces, the other 100 background


@dataclass(frozen=True)
class Photo:
    name: str
    category: str
    description: str


_SHIPPED: dict[str, tuple[str, str, Callable[[], np.ndarray]]] = {
    "astronaut": ("natural", "astronaut Eileen Collins, RGB", skdata.astronaut),
    "camera": ("natural", "man with a camera, grayscale", skdata.camera),
    "chelsea": ("natural", "Chelsea the cat, RGB", skdata.chelsea),
    "clock": ("natural", "motion-blurred wall clock, grayscale", skdata.clock),
    "coffee": ("natural", "cup of coffee, RGB", skdata.coffee),
    "coins": ("natural", "Greek coins, grayscale", skdata.coins),
    "moon": ("natural", "surface of the moon, grayscale", skdata.moon),
    "rocket": ("natural", "SpaceX Falcon 9 launch, RGB", skdata.rocket),
    "cell": ("scientific", "cell under a microscope, grayscale", skdata.cell),
    "hubble_deep_field": ("scientific", "Hubble deep field, RGB", skdata.hubble_deep_field),
    "immunohistochemistry": ("scientific", "stained tissue, RGB", skdata.immunohistochemistry),
    "microaneurysms": ("scientific", "retinal microaneurysms, grayscale", skdata.microaneurysms),
    "retina": ("scientific", "human retina, RGB", skdata.retina),
    "brick": ("texture", "brick wall, grayscale", skdata.brick),
    "grass": ("texture", "grass, grayscale", skdata.grass),
    "gravel": ("texture", "gravel, grayscale", skdata.gravel),
    "page": ("text", "scanned book page, grayscale", skdata.page),
    "text": ("text", "photographed text, grayscale", skdata.text),
    "checkerboard": ("synthetic", "checkerboard, grayscale", skdata.checkerboard),
    "colorwheel": ("synthetic", "colour wheel, RGB", skdata.colorwheel),
    "horse": ("synthetic", "horse silhouette, binary", skdata.horse),
    "shepp_logan_phantom": ("synthetic", "Shepp-Logan phantom, grayscale", skdata.shepp_logan_phantom),
}
# Other names scikit-image uses for the same pictures.
ALIASES = {"cat": "chelsea", "ihc": "immunohistochemistry"}


def _face_name(i: int) -> str:
    return f"face{i:02d}"


PHOTOS: dict[str, Photo] = {
    **{name: Photo(name, cat, desc) for name, (cat, desc, _) in _SHIPPED.items()},
    **{
        _face_name(i): Photo(_face_name(i), "face", f"LFW face crop {i}, 25x25 grayscale")
        for i in range(NUM_FACES)
    },
}
CATEGORIES = sorted({p.category for p in PHOTOS.values()})


def photo_names(category: str | None = None) -> list[str]:
    """Names of the shipped photos, optionally of one category (see CATEGORIES)."""
    if category is not None and category not in CATEGORIES:
        raise UnknownNameError("photo category", category, CATEGORIES)
    return [n for n, p in PHOTOS.items() if category is None or p.category == category]


def _valid_names_for_error() -> list[str]:
    # 100 face names would drown the message; one range entry stands for them.
    return [*_SHIPPED, *ALIASES, f"{_face_name(0)}..{_face_name(NUM_FACES - 1)}"]


def resolve_photo_name(name: str) -> str:
    canonical = ALIASES.get(name, name)
    if canonical not in PHOTOS:
        raise UnknownNameError("photo", name, _valid_names_for_error())
    return canonical


@lru_cache(maxsize=1)
def _faces() -> np.ndarray:
    faces = np.asarray(skdata.lfw_subset()[:NUM_FACES])
    faces.flags.writeable = False
    return faces


@cache
def _original(name: str) -> np.ndarray:
    """The decoded full-resolution photo, cached read-only in its compact stored dtype."""
    arr = _faces()[int(name[len("face") :])] if name not in _SHIPPED else np.asarray(_SHIPPED[name][2]())
    arr.flags.writeable = False
    return arr


def load_photo(name: str, size: int, channels: int = 3) -> torch.Tensor:
    """A shipped photo as a fresh (channels, size, size) float32 tensor in [0, 1].

    Centre-cropped to a square and resized with antialiased bilinear interpolation; grayscale
    photos are replicated to 3 channels, RGB photos converted to gray with BT.601 luma.
    """
    canonical = resolve_photo_name(name)
    check_size(size)
    check_channels(channels)
    # array_to_tensor always copies, so the cached original is never handed out.
    return square_image(array_to_tensor(_original(canonical)), size, channels)
