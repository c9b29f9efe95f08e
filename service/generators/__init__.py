"""Generators: the architectures an attacker at knowledge level 2 holds (trained on data like
the client's), their files (safetensors with a manifest) and their offline training.

Importing this package does not import torch (the API reads manifests without it): the manifest
names are imported here, the torch-backed ones on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from service.generators.manifest import METADATA_KEY, GeneratorManifest

if TYPE_CHECKING:
    from service.generators.archs import (
        GENERATOR_ARCHS,
        DCGANGenerator,
        GeneratorArch,
        MLPGenerator,
        build_generator,
        generator_catalog,
    )
    from service.generators.io import (
        LoadedGenerator,
        check_generator_file,
        generator_bytes,
        generator_tensors,
        load_generator,
        load_generator_file,
        read_manifest,
        sample_latents,
        save_generator,
    )

_LAZY = {
    "service.generators.archs": (
        "GENERATOR_ARCHS",
        "DCGANGenerator",
        "GeneratorArch",
        "MLPGenerator",
        "build_generator",
        "generator_catalog",
    ),
    "service.generators.io": (
        "LoadedGenerator",
        "check_generator_file",
        "generator_bytes",
        "generator_tensors",
        "load_generator",
        "load_generator_file",
        "read_manifest",
        "sample_latents",
        "save_generator",
    ),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'service.generators' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "GENERATOR_ARCHS",
    "METADATA_KEY",
    "DCGANGenerator",
    "GeneratorArch",
    "GeneratorManifest",
    "LoadedGenerator",
    "MLPGenerator",
    "build_generator",
    "check_generator_file",
    "generator_bytes",
    "generator_catalog",
    "generator_tensors",
    "load_generator",
    "load_generator_file",
    "read_manifest",
    "sample_latents",
    "save_generator",
]
