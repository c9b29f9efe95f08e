"""gradleak's data: photos shipped by scikit-image, local image folders, local CIFAR copies, a
small labelled patch task, and normalisation. Nothing here downloads anything."""

from service.data.cifar import cifar_classes, cifar_dir, load_cifar, restricted_unpickle
from service.data.folder import FolderIndex, index_folder, load_folder, read_image
from service.data.images import (
    LUMA_WEIGHTS,
    denormalize,
    normalize,
    resize,
    square_image,
    to_channels,
)
from service.data.patches import DEFAULT_PATCH_PHOTOS, photo_patches, train_test_split
from service.data.photos import ALIASES, CATEGORIES, PHOTOS, Photo, load_photo, photo_names
from service.data.sources import SOURCES, Source, load_images

__all__ = [
    "ALIASES",
    "CATEGORIES",
    "DEFAULT_PATCH_PHOTOS",
    "LUMA_WEIGHTS",
    "PHOTOS",
    "SOURCES",
    "FolderIndex",
    "Photo",
    "Source",
    "cifar_classes",
    "cifar_dir",
    "denormalize",
    "index_folder",
    "load_cifar",
    "load_folder",
    "load_images",
    "load_photo",
    "normalize",
    "photo_names",
    "photo_patches",
    "read_image",
    "resize",
    "restricted_unpickle",
    "square_image",
    "to_channels",
    "train_test_split",
]
