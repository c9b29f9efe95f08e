"""Generators: the architectures an attacker at knowledge level 2 holds (trained on data like
the client's), their files (safetensors with a manifest) and their offline training.

Importing this package imports torch; `service.generators.manifest` alone does not."""

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
from service.generators.manifest import METADATA_KEY, GeneratorManifest

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
